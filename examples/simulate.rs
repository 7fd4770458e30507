//! The key-economy simulator: kcp against the original round robin on every scenario.
//!
//! Run with `cargo run --release --example simulate [seed]`. Prints a markdown table (the
//! one kept in `docs/key-economy.md`) and, for the 80% Poisson scenario, what kcp learned
//! about each key.

use key_cycle_proxy::simulate::{
    self, DEFAULT_SEED, Policy, Scenario, Workload, key_table, run, run_all, table,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|e| format!("seed must be an unsigned integer: {e}"))?,
        None => DEFAULT_SEED,
    };
    let policies = [Policy::Kcp, Policy::KcpRoundRobin, Policy::NaiveRoundRobin];
    let reports = run_all(&simulate::suite(), &policies, seed);
    println!(
        "seed {seed}, {} simulated per scenario\n",
        fmt(simulate::DURATION)
    );
    println!("{}", table(&reports));
    let poisson = run(&Scenario::tiered(Workload::Poisson, 0.8), Policy::Kcp, seed);
    println!("keys of `{}` under kcp:\n", poisson.scenario);
    println!("{}", key_table(&poisson));
    Ok(())
}

fn fmt(d: std::time::Duration) -> String {
    format!("{} min", d.as_secs() / 60)
}
