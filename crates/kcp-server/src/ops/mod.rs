//! Running the proxy as a process: binding and serving connections, draining on shutdown
//! ([`serve`]) on worker threads ([`workers`]), bounding each connection ([`connection`]),
//! reacting to signals ([`signals`]) and swapping in a reloaded config ([`reload`]).
pub mod connection;
pub mod reload;
pub mod serve;
pub mod signals;
pub mod workers;
