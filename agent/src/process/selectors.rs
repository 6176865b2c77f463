//! Selectors derived from the kernel's record of a process: here, the ones read off its
//! cgroup v2 path. The `Selector` type itself is shared with the server (tether-attestors).
//!
//! A cgroup's *name* is chosen by whoever may create directories where it sits, so a name
//! only vouches for something when the system made it. Each component of the path counts as
//! the system's only if its parent directory can be written by root alone (owned by uid 0,
//! no group or other write). systemd delegates `user@UID.service` to its user by handing the
//! directory over: everything below it is the user's choice, whatever it is called. So:
//! - `systemd:id` names the innermost unit in the system's part of the path (for a user's
//!   processes that is `user@UID.service`, as systemd itself would say);
//! - a unit in a delegated part yields only `systemd:user-unit:<uid>:<unit>`, naming the uid
//!   the subtree was delegated to;
//! - container and Kubernetes selectors come only from the runtimes' own cgroup roots
//!   ([`SelectorConfig`]), and only from the system's part of the path.

use std::path::Path;

pub use tether_attestors::{Selector, SelectorError};

use crate::config::SelectorConfig;

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Container runtimes recognisable from their cgroup names.
const RUNTIME_PREFIXES: &[(&str, &str)] =
    &[("docker-", "docker"), ("cri-containerd-", "containerd"), ("crio-", "cri-o"), ("libpod-", "podman")];

/// Who made the components of a cgroup path: the first `system` components were each made in
/// a directory only root can write; `delegated_to` owns the directory where the rest was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    pub system: usize,
    pub delegated_to: Option<u32>,
}

impl Provenance {
    /// The whole path is the system's (for tests of the naming rules).
    pub fn system(path: &str) -> Provenance {
        Provenance { system: components(path).len(), delegated_to: None }
    }
}

fn components(path: &str) -> Vec<&str> {
    path.split('/').filter(|p| !p.is_empty()).collect()
}

/// Reads the provenance of `path` (relative to `cgroup_root`) from the ownership and mode of
/// each directory on the way down. A directory that cannot be read ends the system's part
/// (fail closed).
pub fn provenance(cgroup_root: &Path, path: &str) -> Provenance {
    use std::os::unix::fs::MetadataExt;
    let parts = components(path);
    let mut dir = cgroup_root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        match std::fs::metadata(&dir) {
            Ok(m) if m.uid() == 0 && m.mode() & 0o022 == 0 => {}
            Ok(m) => return Provenance { system: i, delegated_to: Some(m.uid()) },
            Err(_) => return Provenance { system: i, delegated_to: None },
        }
        dir.push(part);
    }
    Provenance { system: parts.len(), delegated_to: None }
}

fn is_unit(part: &str) -> bool {
    part.ends_with(".service") || part.ends_with(".scope")
}

/// Selectors read off a cgroup v2 path (relative to the cgroup2 root, starting with `/`):
/// `cgroup:path` always (it is the kernel's fact); the system's innermost systemd unit; a
/// delegated user unit; container id and runtime, Kubernetes pod UID and QoS class from the
/// configured runtime roots.
pub fn cgroup_selectors(path: &str, prov: &Provenance, cfg: &SelectorConfig) -> Vec<Selector> {
    let mut out = vec![Selector::new("cgroup", format!("path:{path}"))];
    let parts = components(path);
    let system = &parts[..prov.system.min(parts.len())];

    if let Some(unit) = system.iter().rev().find(|p| is_unit(p)) {
        out.push(Selector::new("systemd", format!("id:{unit}")));
    }
    if let (Some(uid), Some(unit)) = (prov.delegated_to, parts[system.len()..].iter().rev().find(|p| is_unit(p))) {
        out.push(Selector::new("systemd", format!("user-unit:{uid}:{unit}")));
    }

    // The components below a configured root, within the system's part.
    let below = |roots: &[String]| -> Option<(usize, &[&str])> {
        roots
            .iter()
            .map(|r| components(r))
            .filter(|r| system.len() > r.len() && system[..r.len()] == r[..])
            .map(|r| (r.len(), &system[r.len()..]))
            .max_by_key(|(len, _)| *len)
    };

    if let Some((start, region)) = below(&cfg.container_roots) {
        if let Some((runtime, id)) = container(region, start, system) {
            out.push(Selector::new("cgroup", format!("container-id:{id}")));
            if let Some(rt) = runtime {
                out.push(Selector::new("cgroup", format!("container-runtime:{rt}")));
            }
        }
    }
    if let Some((_, region)) = below(&cfg.kubernetes_roots) {
        let mut qos = "guaranteed";
        for part in region {
            let name = part.strip_suffix(".slice").unwrap_or(part);
            let name = name.rsplit_once("kubepods-").map_or(name, |(_, n)| n);
            for class in ["burstable", "besteffort"] {
                if name == class || name.starts_with(&format!("{class}-")) {
                    qos = class;
                }
            }
            let pod = name
                .rsplit_once("pod")
                .map(|(_, uid)| uid)
                .filter(|_| name.starts_with("pod") || name.contains("-pod"));
            if let Some(uid) = pod.filter(|uid| !uid.is_empty()) {
                out.push(Selector::new("k8s", format!("pod-uid:{}", uid.replace('_', "-"))));
                out.push(Selector::new("k8s", format!("qos:{qos}")));
                break;
            }
        }
    }
    out
}

/// The innermost component of `region` (which starts at index `start` of `parts`) that names
/// a container: (runtime if known, id).
fn container<'a>(region: &[&'a str], start: usize, parts: &[&str]) -> Option<(Option<&'static str>, &'a str)> {
    for (i, part) in region.iter().enumerate().rev() {
        let name = part.strip_suffix(".scope").unwrap_or(part);
        if name.starts_with("crio-conmon-") {
            continue; // CRI-O's monitor process, not the container
        }
        if let Some((runtime, id)) = RUNTIME_PREFIXES
            .iter()
            .find_map(|(prefix, rt)| name.strip_prefix(prefix).filter(|id| is_hex_id(id)).map(|id| (*rt, id)))
        {
            return Some((Some(runtime), id));
        }
        // cgroupfs drivers: a bare id under /docker/ or under a pod directory.
        if is_hex_id(name) {
            let parent = (start + i).checked_sub(1).map(|j| parts[j]).unwrap_or("");
            return Some(((parent == "docker").then_some("docker"), name));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1a6cfa9b2c1e3d5f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e";
    const UID: &str = "7b3d2a10-9c8e-4f6a-b5d4-3c2b1a0f9e8d";

    fn sel(path: &str) -> Vec<String> {
        sel_with(path, Provenance::system(path))
    }

    fn sel_with(path: &str, prov: Provenance) -> Vec<String> {
        cgroup_selectors(path, &prov, &SelectorConfig::default()).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn real_world_cgroup_layouts() {
        let uid_ = UID.replace('-', "_");
        let cases: Vec<(String, Vec<String>)> = vec![
            // systemd service
            ("/system.slice/nginx.service".into(), vec!["systemd:id:nginx.service".into()]),
            // a subtree below a service
            ("/system.slice/app.service/worker".into(), vec!["systemd:id:app.service".into()]),
            // docker, systemd driver
            (
                format!("/system.slice/docker-{ID}.scope"),
                vec![format!("cgroup:container-id:{ID}"), "cgroup:container-runtime:docker".into()],
            ),
            // docker, cgroupfs driver
            (format!("/docker/{ID}"), vec![format!("cgroup:container-id:{ID}"), "cgroup:container-runtime:docker".into()]),
            // containerd under kubepods, systemd driver, burstable
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                vec![
                    format!("cgroup:container-id:{ID}"),
                    "cgroup:container-runtime:containerd".into(),
                    format!("k8s:pod-uid:{UID}"),
                    "k8s:qos:burstable".into(),
                ],
            ),
            // containerd, cgroupfs driver, besteffort
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                vec![format!("cgroup:container-id:{ID}"), format!("k8s:pod-uid:{UID}"), "k8s:qos:besteffort".into()],
            ),
            // guaranteed pods sit directly under kubepods
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                vec![format!("k8s:pod-uid:{UID}"), "k8s:qos:guaranteed".into()],
            ),
            // CRI-O, systemd driver; conmon is not the container
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope"),
                vec![format!("cgroup:container-id:{ID}"), "cgroup:container-runtime:cri-o".into(), "k8s:qos:besteffort".into()],
            ),
            // kind / nested kubelet
            (
                format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                vec![format!("k8s:pod-uid:{UID}"), "k8s:qos:burstable".into()],
            ),
            // podman
            (format!("/machine.slice/libpod-{ID}.scope"), vec!["cgroup:container-runtime:podman".into()]),
        ];
        for (path, want) in cases {
            let got = sel(&path);
            assert_eq!(got[0], format!("cgroup:path:{path}"));
            for w in &want {
                assert!(got.contains(w), "{path}: missing {w} in {got:?}");
            }
        }
    }

    #[test]
    fn names_in_a_delegated_subtree_are_the_users_not_the_systems() {
        let uid_ = UID.replace('-', "_");
        // systemd hands user@65534.service to uid 65534: its parent is the last directory only
        // root writes.
        let base = "/user.slice/user-65534.slice/user@65534.service";
        let delegated = |_: &str| Provenance { system: 3, delegated_to: Some(65534) };
        let path = format!("{base}/app.slice/payments.service");
        let got = sel_with(&path, delegated(&path));
        assert!(got.contains(&"systemd:id:user@65534.service".to_string()), "{got:?}");
        assert!(got.contains(&"systemd:user-unit:65534:payments.service".to_string()), "{got:?}");
        assert!(!got.contains(&"systemd:id:payments.service".to_string()), "{got:?}");
        // A Kubernetes-looking tree built inside it names no pod and no container.
        let path = format!(
            "{base}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
        );
        let got = sel_with(&path, delegated(&path));
        assert!(!got.iter().any(|s| s.starts_with("k8s:") || s.starts_with("cgroup:container")), "{got:?}");
        // Nor does a runtime-looking name under a system root the user could create in.
        let path = format!("/system.slice/docker-{ID}.scope");
        let got = sel_with(&path, Provenance { system: 1, delegated_to: Some(1000) });
        assert!(!got.iter().any(|s| s.starts_with("cgroup:container")), "{got:?}");
    }

    #[test]
    fn container_names_outside_the_runtime_roots_name_nothing() {
        let got = sel(&format!("/tether-test-x/docker-{ID}.scope"));
        assert!(!got.iter().any(|s| s.starts_with("cgroup:container")), "{got:?}");
        let got = sel(&format!("/tether-test-x/kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_")));
        assert!(!got.iter().any(|s| s.starts_with("k8s:")), "{got:?}");
        // The root itself is not a container.
        let got = sel("/docker");
        assert_eq!(got, vec!["cgroup:path:/docker".to_string()]);
        // Configured roots are honoured (how tests and unusual runtimes set them).
        let cfg = SelectorConfig { container_roots: vec!["/tether-test-x".into()], kubernetes_roots: vec![] };
        let path = format!("/tether-test-x/docker-{ID}.scope");
        let got: Vec<String> =
            cgroup_selectors(&path, &Provenance::system(&path), &cfg).iter().map(ToString::to_string).collect();
        assert!(got.contains(&format!("cgroup:container-id:{ID}")), "{got:?}");
    }

    #[test]
    fn conmon_and_plain_paths_name_no_container() {
        let got = sel(&format!("/kubepods.slice/kubepods-besteffort.slice/x-pod1.slice/crio-conmon-{ID}.scope"));
        assert!(!got.iter().any(|s| s.starts_with("cgroup:container-id")), "{got:?}");
        let got = sel("/tether-test-x/leaf");
        assert_eq!(got, vec!["cgroup:path:/tether-test-x/leaf".to_string()]);
        let got = sel("/");
        assert_eq!(got, vec!["cgroup:path:/".to_string()]);
    }

    #[test]
    fn roots_are_checked() {
        assert!(SelectorConfig::default().validate().is_ok());
        for bad in ["kubepods", "/", "/a//b", "/a/../b"] {
            let cfg = SelectorConfig { container_roots: vec![bad.into()], kubernetes_roots: vec![] };
            assert!(cfg.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn provenance_reads_ownership_on_the_way_down() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        for d in ["", "a", "a/b", "a/b/c"] {
            std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let owner = |p: &str| std::fs::metadata(root.join(p)).map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
        // Whoever runs the test owns the temporary tree: everything is "the system's" only
        // when that is root; either way the rule reads each parent.
        let prov = provenance(root, "/a/b/c");
        if owner("") == 0 {
            assert_eq!(prov, Provenance { system: 3, delegated_to: None });
            // A group-writable directory hands what is below it to others.
            std::fs::set_permissions(root.join("a"), std::fs::Permissions::from_mode(0o775)).unwrap();
            assert_eq!(provenance(root, "/a/b/c"), Provenance { system: 1, delegated_to: Some(0) });
        } else {
            assert_eq!(prov, Provenance { system: 0, delegated_to: Some(owner("")) });
        }
        // A directory that cannot be read ends the system's part.
        assert_eq!(provenance(Path::new("/nonexistent-tether"), "/x").system, 0);
    }
}
