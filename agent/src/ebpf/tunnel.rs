//! The maps the agent's tunnel uses directly, opened from the enforcement's pins: the
//! captured connections the kernel published (`TUNNEL_CONNS`), and socket storage to stamp
//! the sockets the tunnel opens on behalf of remote peers (`SOCK_STATE`).
//!
//! Everything else of the tunnel's kernel side (which remote workloads are captured, where
//! to) is written by the enforcement loop, the one owner of the enforcement configuration.

use std::{os::fd::AsRawFd, path::Path};

use aya::maps::{HashMap, Map, MapData, MapError, SkStorage};
use tether_common::{key_kind, maps, sock_role, SockState, TunnelConn, TupleKey};

use super::{enforce::pinned_map_path, map_err, EbpfError};

pub struct TunnelMaps {
    conns: HashMap<MapData, TupleKey, TunnelConn>,
    sock_state: SkStorage<MapData, SockState>,
}

fn open(pin_dir: &Path, name: &'static str) -> Result<MapData, EbpfError> {
    MapData::from_pin(pinned_map_path(pin_dir, name)).map_err(map_err(name, "open pinned"))
}

impl TunnelMaps {
    /// Opens the pinned maps of the enforcement running on `pin_dir` (its `[enforcement]
    /// pin_dir`): enforcement must have started first.
    pub fn open(pin_dir: &Path) -> Result<Self, EbpfError> {
        let conns = HashMap::try_from(Map::LruHashMap(open(pin_dir, maps::TUNNEL_CONNS)?))
            .map_err(map_err(maps::TUNNEL_CONNS, "open"))?;
        let sock_state = SkStorage::try_from(Map::SkStorage(open(pin_dir, maps::SOCK_STATE)?))
            .map_err(map_err(maps::SOCK_STATE, "open"))?;
        Ok(TunnelMaps { conns, sock_state })
    }

    /// Takes (reads and removes) what the kernel recorded of the captured connection whose
    /// client end is `key`; None if it recorded nothing (the connection was not captured).
    pub fn take_conn(&mut self, key: &TupleKey) -> Result<Option<TunnelConn>, EbpfError> {
        match self.conns.get(key, 0) {
            Ok(conn) => {
                let _ = self.conns.remove(key);
                Ok(Some(conn))
            }
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(source) => Err(EbpfError::Map { name: maps::TUNNEL_CONNS, op: "get", source }),
        }
    }

    /// Forgets every recorded connection (at start: a previous agent's leftovers name
    /// connections nobody will accept again).
    pub fn clear_conns(&mut self) -> Result<usize, EbpfError> {
        let keys: Vec<TupleKey> =
            self.conns.keys().collect::<Result<_, _>>().map_err(map_err(maps::TUNNEL_CONNS, "keys"))?;
        for k in &keys {
            let _ = self.conns.remove(k);
        }
        Ok(keys.len())
    }

    /// Stamps the capture listener as the agent's: the kernel captures connections only into
    /// a listener so stamped.
    pub fn stamp_listener(&mut self, socket: &impl AsRawFd) -> Result<(), EbpfError> {
        let state = SockState {
            key_valid: key_kind::TUNNEL_LISTENER,
            tgid: std::process::id(),
            role: sock_role::INBOUND,
            ..SockState::default()
        };
        self.sock_state.insert(socket, state, 0).map_err(map_err(maps::SOCK_STATE, "insert"))
    }

    /// Stamps a socket the tunnel made (not yet connected) as carrying the remote peer
    /// `identity`: a protected workload receiving its connection judges it by that identity.
    /// Only a process that can write the map (root, holding the pin) can make such a state.
    pub fn stamp_peer(&mut self, socket: &impl AsRawFd, identity: u32) -> Result<(), EbpfError> {
        let state = SockState {
            key_valid: key_kind::TUNNEL_PEER,
            id: identity,
            tgid: std::process::id(),
            role: sock_role::OUTBOUND,
            ..SockState::default()
        };
        self.sock_state.insert(socket, state, 0).map_err(map_err(maps::SOCK_STATE, "insert"))
    }
}
