//! Which address other workers' ranks reach this worker's ranks at.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// The address a worker advertises for its ranks' TCP ring listeners when
/// `--collective-host` is not given: the local IP address of the interface that routes to
/// the (first) coordinator, so ranks on other machines can reach it wherever the
/// coordinator can. A loopback coordinator (a one-machine cluster) gives `127.0.0.1`.
/// Falls back to the host name if the coordinator's address cannot be resolved.
pub fn collective_host_for(coordinator_url: &str) -> String {
    route_ip(coordinator_url)
        .map(|ip| ip.to_string())
        .unwrap_or_else(crate::agent::hostname)
}

fn route_ip(coordinator_url: &str) -> Option<IpAddr> {
    let first = coordinator_url.split(',').next()?.trim();
    let without_scheme = first.split_once("://").map(|(_, r)| r).unwrap_or(first);
    let authority = without_scheme.split('/').next()?;
    let target: SocketAddr = authority.to_socket_addrs().ok()?.next()?;
    if target.ip().is_loopback() {
        return Some(target.ip());
    }
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    // Connecting a UDP socket sends nothing; it only asks the kernel for the route.
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_coordinators_give_loopback() {
        assert_eq!(collective_host_for("http://127.0.0.1:7800"), "127.0.0.1");
        assert_eq!(
            collective_host_for("http://127.0.0.1:7800,http://127.0.0.1:7801"),
            "127.0.0.1"
        );
        assert_eq!(collective_host_for("http://[::1]:7800"), "::1");
    }

    #[test]
    fn unresolvable_coordinators_fall_back_to_the_host_name() {
        let h = collective_host_for("http://no-such-host.invalid:7800");
        assert!(!h.is_empty());
        assert_eq!(h, crate::agent::hostname());
    }
}
