//! The Tether node agent.
//!
//! `ebpf` is the only module that talks to the kernel's BPF subsystem (and the only one that
//! imports aya); the rest works on the records it produces.

pub mod api_client;
pub mod cgroup;
pub mod config;
pub mod ebpf;
pub mod enforcement;
pub mod h2_authority;
pub mod identity;
pub mod manager;
pub mod mesh;
pub mod netns;
pub mod node_client;
pub mod persist;
pub mod policy;
pub mod process;
pub mod server_tls;
pub mod svid;
pub mod telemetry;
pub mod tpm;
pub mod tunnel;
pub mod workload_api;

/// The agent's layering, checked from its source: who imports whom through `crate::`, per
/// top-level module. A change that makes `config` depend on the agent, lifts `identity` above
/// the modules that share it, lets the Workload API reach into the manager, or closes a
/// cycle anywhere fails here.
#[cfg(test)]
mod structure {
    use std::{
        collections::{BTreeMap, BTreeSet},
        path::Path,
    };

    /// Top-level module → the other top-level modules it names as `crate::<module>`.
    type Graph = BTreeMap<String, BTreeSet<String>>;

    /// The source with comments, string and character literals blanked, so only code is
    /// read (a doc link or a message naming a module is no import).
    fn code_only(src: &str) -> String {
        let b = src.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        let blank = |out: &mut Vec<u8>, s: &[u8]| out.extend(s.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }));
        while i < b.len() {
            let rest = &b[i..];
            let end = if rest.starts_with(b"//") {
                rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
            } else if rest.starts_with(b"/*") {
                let mut depth = 0;
                let mut j = 0;
                while j < rest.len() {
                    if rest[j..].starts_with(b"/*") {
                        depth += 1;
                        j += 2;
                    } else if rest[j..].starts_with(b"*/") {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        j += 1;
                    }
                }
                j
            } else if let Some(hashes) = raw_string_start(b, i) {
                let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
                let open = hashes + 2;
                open + rest[open..].windows(close.len()).position(|w| w == close.as_slice()).unwrap_or(rest.len())
                    + close.len()
            } else if rest[0] == b'"' {
                let mut j = 1;
                while j < rest.len() && rest[j] != b'"' {
                    j += if rest[j] == b'\\' { 2 } else { 1 };
                }
                j + 1
            } else if rest[0] == b'\'' && rest.get(1) == Some(&b'\\') {
                // '\n', '\'', '\u{..}': the escaped character, then up to the closing quote.
                3 + rest.get(3..).and_then(|r| r.iter().position(|&c| c == b'\'')).map_or(rest.len(), |p| p + 1)
            } else if rest[0] == b'\'' && rest.get(2) == Some(&b'\'') {
                3
            } else {
                out.push(rest[0]);
                i += 1;
                continue;
            };
            let end = end.min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// `r"`, `r#"`, `br"`…: the number of hashes of a raw string starting at `i`.
    fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
        if b[i] != b'r' || (i > 0 && is_ident(b[i - 1]) && b[i - 1] != b'b') {
            return None;
        }
        if i > 1 && b[i - 1] == b'b' && is_ident(b[i - 2]) {
            return None;
        }
        let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
        (b.get(i + 1 + hashes) == Some(&b'"')).then_some(hashes)
    }

    fn is_ident(c: u8) -> bool {
        c.is_ascii_alphanumeric() || c == b'_'
    }

    fn ident_at(s: &[u8], i: usize) -> &str {
        let n = s[i..].iter().take_while(|&&c| is_ident(c)).count();
        std::str::from_utf8(&s[i..i + n]).unwrap_or_default()
    }

    /// The first path segment after each `crate::`, including every member of a
    /// `crate::{a, b::c, d::{e, f}}` group.
    fn crate_modules(code: &str) -> BTreeSet<String> {
        let s = code.as_bytes();
        let mut found = BTreeSet::new();
        let mut from = 0;
        while let Some(p) = code[from..].find("crate::") {
            let at = from + p;
            from = at + "crate::".len();
            if at > 0 && (is_ident(s[at - 1]) || s[at - 1] == b'$') {
                continue;
            }
            let mut i = from;
            while s.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            if s.get(i) != Some(&b'{') {
                found.insert(ident_at(s, i).to_owned());
                continue;
            }
            let (mut depth, mut expect) = (0, true);
            while i < s.len() {
                match s[i] {
                    b'{' => {
                        depth += 1;
                        expect = depth == 1;
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => expect = true,
                    c if expect && is_ident(c) => {
                        found.insert(ident_at(s, i).to_owned());
                        expect = false;
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        found.retain(|m| !m.is_empty() && m != "self");
        found
    }

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }

    /// The agent library's module graph, from `agent/src` (lib.rs declares the modules; the
    /// binary, main.rs, sits above them all).
    fn graph() -> Graph {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let lib = code_only(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
        let modules: BTreeSet<String> = lib
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
            .filter_map(|l| l.strip_suffix(';'))
            .map(str::to_owned)
            .collect();
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut g: Graph = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_string_lossy();
            let top = top.strip_suffix(".rs").unwrap_or(&top).to_owned();
            if !modules.contains(&top) {
                continue;
            }
            let code = code_only(&std::fs::read_to_string(&file).unwrap());
            let deps = g.get_mut(&top).unwrap();
            deps.extend(crate_modules(&code).into_iter().filter(|m| *m != top && modules.contains(m)));
        }
        g
    }

    /// A cycle of the graph, if there is one (depth-first search).
    fn cycle(g: &Graph) -> Option<Vec<String>> {
        fn visit(g: &Graph, m: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|p| p == m) {
                let mut c = path[at..].to_vec();
                c.push(m.to_owned());
                return Some(c);
            }
            if done.contains(m) {
                return None;
            }
            path.push(m.to_owned());
            for d in g.get(m).into_iter().flatten() {
                if let Some(c) = visit(g, d, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(m.to_owned());
            None
        }
        let mut done = BTreeSet::new();
        g.keys().find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_imports_from_code_only() {
        let src = r#"
            use crate::{a, b::{c, d}, e::f as g,
                h};
            // crate::commented
            /* crate::blocked /* nested */ crate::still */
            let s = "crate::quoted \" crate::escaped"; let r = r"crate::raw"; let c = '"'; let l: &'x str;
            x(crate::called::f(), my_crate::not_ours, $crate::macro_path, '\'', crate::after_char);
        "#;
        assert_eq!(crate_modules(&code_only(src)), set(&["a", "after_char", "b", "called", "e", "h"]));
    }

    #[test]
    fn the_agent_is_layered() {
        let g = graph();
        let deps = |m: &str| g.get(m).unwrap_or_else(|| panic!("no module {m}"));
        // The reader works: these are imports the agent must have.
        assert!(deps("manager").is_superset(&set(&["identity", "node_client"])), "{g:#?}");

        assert!(deps("config").is_empty(), "config must be a leaf; it imports {:?}", deps("config"));
        assert!(
            deps("identity").is_subset(&set(&["svid"])),
            "identity sits below every module that shares its types; it may import only svid, not {:?}",
            deps("identity")
        );
        assert!(
            !deps("workload_api").contains("manager"),
            "the Workload API reaches the manager only through identity::IdentitySource"
        );
        for m in ["persist", "enforcement"] {
            for above in ["manager", "node_client", "workload_api", "tunnel"] {
                assert!(!deps(m).contains(above), "{m} must not import {above}");
            }
        }
        if let Some(c) = cycle(&g) {
            panic!("the agent's modules import one another in a cycle: {}", c.join(" -> "));
        }
    }
}
