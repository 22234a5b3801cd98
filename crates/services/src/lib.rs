//! Health, Status, VM and Monitoring service logic, with no transport code.
//!
//! Not built yet: the services issue fills this crate. It exports nothing.
