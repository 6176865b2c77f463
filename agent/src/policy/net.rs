//! The network vocabulary of rules: IPv4 ranges, port ranges, transport protocols.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// An IPv4 network with its host bits zero, so that equal networks compare equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    /// Network byte order, as the kernel sees addresses.
    pub addr: [u8; 4],
    /// 0..=32.
    pub prefix: u8,
}

impl Ipv4Net {
    /// Accepts `a.b.c.d/n` or a plain address (a /32). The message is the whole complaint, for
    /// the caller to place in the file.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        if addr.parse::<Ipv6Addr>().is_ok() {
            return Err(format!("{s:?} is IPv6; only IPv4 is enforced yet"));
        }
        // std refuses leading zeros, which some tools read as octal: better an error than a
        // different network than the author meant.
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
        let prefix = match prefix {
            None => 32,
            Some(p) if !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s:?} is not an IPv4 CIDR"))?
            }
            Some(_) => return Err(format!("{s:?} is not an IPv4 CIDR")),
        };
        let net = Ipv4Net { addr: addr.octets(), prefix };
        if net.masked() != net {
            // A rule author writing 10.1.2.3/8 may have meant /32; widening silently would
            // allow far more than intended.
            return Err(format!("{s:?} has host bits set; the network is {}", net.masked()));
        }
        Ok(net)
    }

    fn mask(self) -> u32 {
        match self.prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p.min(32))),
        }
    }

    fn masked(self) -> Self {
        Ipv4Net { addr: (u32::from_be_bytes(self.addr) & self.mask()).to_be_bytes(), prefix: self.prefix }
    }

    pub fn contains(self, addr: [u8; 4]) -> bool {
        u32::from_be_bytes(addr) & self.mask() == u32::from_be_bytes(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.prefix)
    }
}

/// An inclusive port range; a single port is `lo == hi`. Port 0 never appears.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange { lo: 1, hi: u16::MAX };

    /// Accepts `"443"` or `"8000-8080"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port or a \"lo-hi\" port range");
        let port = |p: &str| -> Result<u16, String> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            match p.parse::<u16>() {
                Ok(0) => Err(format!("{s:?}: port 0 is not a port")),
                Ok(n) => Ok(n),
                Err(_) => Err(format!("{s:?}: ports go up to 65535")),
            }
        };
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("{s:?} is an empty range (low end above high end)"));
        }
        Ok(PortRange { lo, hi })
    }

    /// For integers in the file, which TOML gives as i64.
    pub fn single(n: i64) -> Result<Self, String> {
        match u16::try_from(n) {
            Ok(0) => Err("port 0 is not a port".into()),
            Ok(p) => Ok(PortRange { lo: p, hi: p }),
            Err(_) => Err(format!("{n} is not a port (1-65535)")),
        }
    }

    pub fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    /// Sorted, with overlapping and adjacent ranges joined, so each port appears once and the
    /// loader never sees two rows of one rule for the same port. Empty means any port.
    pub fn normalize(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
        if ranges.is_empty() {
            return vec![PortRange::ANY];
        }
        ranges.sort();
        let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => last.hi = last.hi.max(r.hi),
                _ => out.push(r),
            }
        }
        out
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == PortRange::ANY {
            f.write_str("any port")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A transport protocol as the kernel tables know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IPPROTO_* number, which is what sockets and packets carry.
    pub const fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// What a rule's `protocol` key says; `Any` stands for both rows, never for a wildcard row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Any,
}

impl Protocol {
    pub fn protos(self) -> &'static [Proto] {
        match self {
            Protocol::Tcp => &[Proto::Tcp],
            Protocol::Udp => &[Proto::Udp],
            Protocol::Any => &[Proto::Tcp, Proto::Udp],
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "tcp and udp",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let ok = [
            ("10.0.0.0/8", [10, 0, 0, 0], 8),
            ("192.168.1.7", [192, 168, 1, 7], 32),
            ("192.168.1.7/32", [192, 168, 1, 7], 32),
            ("0.0.0.0/0", [0, 0, 0, 0], 0),
            ("172.16.0.0/12", [172, 16, 0, 0], 12),
        ];
        for (s, addr, prefix) in ok {
            assert_eq!(Ipv4Net::parse(s), Ok(Ipv4Net { addr, prefix }), "{s}");
        }
        let bad = [
            ("10.0.0.0/33", "\"10.0.0.0/33\" is not an IPv4 CIDR"),
            ("10.0.0.0/", "\"10.0.0.0/\" is not an IPv4 CIDR"),
            ("10.0.0.0/+8", "\"10.0.0.0/+8\" is not an IPv4 CIDR"),
            ("10.0.0/8", "\"10.0.0/8\" is not an IPv4 CIDR"),
            ("010.0.0.0/8", "\"010.0.0.0/8\" is not an IPv4 CIDR"),
            ("10.1.2.3/8", "\"10.1.2.3/8\" has host bits set; the network is 10.0.0.0/8"),
            ("fd00::/8", "\"fd00::/8\" is IPv6; only IPv4 is enforced yet"),
            ("::ffff:10.0.0.1", "\"::ffff:10.0.0.1\" is IPv6; only IPv4 is enforced yet"),
            ("10.0:0.1", "\"10.0:0.1\" is not an IPv4 CIDR"),
            ("", "\"\" is not an IPv4 CIDR"),
        ];
        for (s, msg) in bad {
            assert_eq!(Ipv4Net::parse(s), Err(msg.to_string()), "{s}");
        }
    }

    #[test]
    fn contains() {
        let net = Ipv4Net::parse("10.0.0.0/8").unwrap();
        assert!(net.contains([10, 255, 1, 2]));
        assert!(!net.contains([11, 0, 0, 0]));
        assert!(Ipv4Net::parse("0.0.0.0/0").unwrap().contains([1, 2, 3, 4]));
        let host = Ipv4Net::parse("192.168.1.7").unwrap();
        assert!(host.contains([192, 168, 1, 7]) && !host.contains([192, 168, 1, 8]));
    }

    #[test]
    fn ports() {
        assert_eq!(PortRange::parse("443"), Ok(PortRange { lo: 443, hi: 443 }));
        assert_eq!(PortRange::parse("8000-8080"), Ok(PortRange { lo: 8000, hi: 8080 }));
        assert_eq!(PortRange::parse("1-65535"), Ok(PortRange::ANY));
        for (s, msg) in [
            ("0", "\"0\": port 0 is not a port"),
            ("0-10", "\"0-10\": port 0 is not a port"),
            ("65536", "\"65536\": ports go up to 65535"),
            ("9-8", "\"9-8\" is an empty range (low end above high end)"),
            ("80-", "\"80-\" is not a port or a \"lo-hi\" port range"),
            (" 80", "\" 80\" is not a port or a \"lo-hi\" port range"),
            ("+80", "\"+80\" is not a port or a \"lo-hi\" port range"),
            ("http", "\"http\" is not a port or a \"lo-hi\" port range"),
        ] {
            assert_eq!(PortRange::parse(s), Err(msg.to_string()), "{s}");
        }
        assert_eq!(PortRange::single(5432), Ok(PortRange { lo: 5432, hi: 5432 }));
        assert!(PortRange::single(0).is_err() && PortRange::single(-1).is_err() && PortRange::single(70000).is_err());
    }

    #[test]
    fn normalize_merges_overlaps_and_neighbours() {
        let r = |lo, hi| PortRange { lo, hi };
        assert_eq!(PortRange::normalize(vec![]), vec![PortRange::ANY]);
        assert_eq!(
            PortRange::normalize(vec![r(8000, 8080), r(443, 443), r(8080, 8090), r(444, 444), r(22, 22)]),
            vec![r(22, 22), r(443, 444), r(8000, 8090)]
        );
        assert_eq!(PortRange::normalize(vec![r(1, 65535), r(80, 80)]), vec![PortRange::ANY]);
        assert_eq!(PortRange::normalize(vec![r(65535, 65535), r(65534, 65535)]), vec![r(65534, 65535)]);
    }

    #[test]
    fn any_protocol_is_both() {
        assert_eq!(Protocol::Any.protos(), &[Proto::Tcp, Proto::Udp]);
        assert_eq!(Protocol::default().protos(), &[Proto::Tcp]);
        assert_eq!((Proto::Tcp.ip_proto(), Proto::Udp.ip_proto()), (6, 17));
    }
}
