//! Just enough of a BTF reader to find struct member offsets in the running kernel.
//!
//! Rust eBPF has no CO-RE relocations, so the programs cannot carry field offsets from the
//! kernel they were built on. Instead the agent reads `/sys/kernel/btf/vmlinux` at load time,
//! resolves the few members the programs dereference, and passes the offsets in as globals.
//! aya-obj parses BTF too but keeps member offsets private.

use std::collections::HashMap;

use thiserror::Error;

/// Where the running kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Why BTF could not be read or a member could not be found.
#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF: {0}")]
    Malformed(&'static str),
    #[error("unknown BTF kind {kind} at type id {id}")]
    UnknownKind { kind: u32, id: u32 },
    #[error("struct {0} not found in kernel BTF")]
    NoStruct(String),
    #[error("member {member} not found in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("member {strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset in bits (or, with kind_flag, bitfield size << 24 | bit offset).
    offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// size for structs/unions/ints, referenced type id for modifiers and typedefs
    size_or_type: u32,
    members: Vec<Member>,
}

/// Parsed type section of a BTF blob.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], off: usize) -> Result<u32, BtfError> {
    data.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> Result<Self, BtfError> {
        let data = std::fs::read(VMLINUX_BTF).map_err(|source| BtfError::Read { path: VMLINUX_BTF.into(), source })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 {
            return Err(BtfError::Malformed("shorter than a header"));
        }
        if u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (or big-endian)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            data.get(start..start.checked_add(len)?)
        };
        let type_data = section(type_off, type_len).ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = section(str_off, str_len).ok_or(BtfError::Malformed("string section out of bounds"))?.to_vec();

        let mut types = vec![Type { name_off: 0, kind: 0, kind_flag: false, size_or_type: 0, members: Vec::new() }];
        let mut pos = 0;
        while pos < type_data.len() {
            let id = types.len() as u32;
            let name_off = u32_at(type_data, pos)?;
            let info = u32_at(type_data, pos + 4)?;
            let size_or_type = u32_at(type_data, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        members.push(Member {
                            name_off: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            offset: u32_at(type_data, m + 8)?,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                kind => return Err(BtfError::UnknownKind { kind, id }),
            };
            pos += extra;
            types.push(Type { name_off, kind, kind_flag, size_or_type, members });
        }
        if pos != type_data.len() {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }

        let mut btf = Btf { strings, types, structs_by_name: HashMap::new() };
        for id in 1..btf.types.len() {
            let t = &btf.types[id];
            // Forward declarations and empty duplicates carry no layout; the first full
            // definition wins.
            if t.kind == KIND_STRUCT && !t.members.is_empty() {
                let name = btf.name(t.name_off).to_owned();
                btf.structs_by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_type,
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct strukt`, looking through anonymous structs and
    /// unions the way C name lookup does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self.structs_by_name.get(strukt).ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let bits = self
            .find_member(&self.types[id as usize], member, 0, strukt)?
            .ok_or_else(|| BtfError::NoMember { strukt: strukt.into(), member: member.into() })?;
        Ok(bits / 8)
    }

    fn find_member(&self, t: &Type, member: &str, base_bits: u32, strukt: &str) -> Result<Option<u32>, BtfError> {
        for m in &t.members {
            let (bits, bitfield) =
                if t.kind_flag { (m.offset & 0x00ff_ffff, m.offset >> 24 != 0) } else { (m.offset, false) };
            if m.name_off == 0 {
                if let Some(inner) = self.resolve(m.type_id) {
                    if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                        if let Some(found) = self.find_member(inner, member, base_bits + bits, strukt)? {
                            return Ok(Some(found));
                        }
                    }
                }
            } else if self.name(m.name_off) == member {
                if bitfield || bits % 8 != 0 {
                    return Err(BtfError::Bitfield { strukt: strukt.into(), member: member.into() });
                }
                return Ok(Some(base_bits + bits));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: `struct outer { int a; union { long b; int c; }; int *d; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0d\0long\0".to_vec();
        let s = |name: &str| {
            strings
                .windows(name.len() + 1)
                .position(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
                .map(|p| p as u32)
                .unwrap_or(0)
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_le_bytes()));
        // 1: int (4 bytes)
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: long (8 bytes)
        push(&[s("long"), KIND_INT << 24, 8, 64]);
        // 3: anonymous union { long b; int c; }
        push(&[0, KIND_UNION << 24 | 2, 8, s("b"), 2, 0, s("c"), 1, 0]);
        // 4: int *
        push(&[0, KIND_PTR << 24, 1]);
        // 5: struct outer { int a @0; union @64; int *d @128 }
        push(&[s("outer"), KIND_STRUCT << 24 | 3, 24, s("a"), 1, 0, 0, 3, 64, s("d"), 4, 128]);
        let mut blob = Vec::new();
        for w in [MAGIC as u32 | 1 << 16, 24, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob[2] = 1; // version
        blob[3] = 0; // flags
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "b").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "d").unwrap(), 16);
    }

    #[test]
    fn names_what_is_missing() {
        let btf = Btf::parse(&sample()).unwrap();
        let err = btf.member_offset("outer", "zz").unwrap_err().to_string();
        assert_eq!(err, "member zz not found in struct outer");
        let err = btf.member_offset("inner", "a").unwrap_err().to_string();
        assert_eq!(err, "struct inner not found in kernel BTF");
    }

    #[test]
    fn rejects_truncated_and_garbage_input() {
        let blob = sample();
        for len in [0, 10, 23, blob.len() - 1] {
            assert!(Btf::parse(&blob[..len]).is_err(), "accepted {len} bytes");
        }
        let mut bad = blob.clone();
        bad[0] = 0;
        assert!(matches!(Btf::parse(&bad), Err(BtfError::Malformed(_))));
    }

    #[test]
    fn reads_the_running_kernel() {
        // Every kernel this agent supports publishes BTF; the offsets the exec program
        // needs must all resolve.
        let btf = Btf::from_kernel().unwrap();
        assert!(btf.member_offset("linux_binprm", "file").is_ok());
        assert!(btf.member_offset("inode", "i_ino").unwrap() > 0);
        assert!(btf.member_offset("super_block", "s_dev").unwrap() > 0);
    }
}
