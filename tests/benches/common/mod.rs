//! Helpers shared by the bench binaries (`#[path]`-included by each).

use std::net::TcpListener;

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
