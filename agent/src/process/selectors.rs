//! Selectors derived from the kernel's record of a process: here, the ones read off its
//! cgroup v2 path. The `Selector` type itself is shared with the server (tether-attestors).

pub use tether_attestors::{Selector, SelectorError};

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Container runtimes recognisable from their cgroup names.
const RUNTIME_PREFIXES: &[(&str, &str)] =
    &[("docker-", "docker"), ("cri-containerd-", "containerd"), ("crio-", "cri-o"), ("libpod-", "podman")];

/// Selectors read off a cgroup v2 path (relative to the cgroup2 root, starting with `/`):
/// `cgroup:path`, the innermost systemd unit, container id and runtime, Kubernetes pod UID
/// and QoS class. Handles systemd and cgroupfs drivers for docker, containerd, CRI-O, podman.
pub fn cgroup_selectors(path: &str) -> Vec<Selector> {
    let mut out = vec![Selector::new("cgroup", format!("path:{path}"))];
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();

    if let Some(unit) = parts.iter().rev().find(|p| p.ends_with(".service") || p.ends_with(".scope")) {
        out.push(Selector::new("systemd", format!("id:{unit}")));
    }

    // Container: the innermost component that names one.
    let mut container = None;
    for (i, part) in parts.iter().enumerate().rev() {
        let name = part.strip_suffix(".scope").unwrap_or(part);
        if name.starts_with("crio-conmon-") {
            continue; // CRI-O's monitor process, not the container
        }
        if let Some((runtime, id)) = RUNTIME_PREFIXES
            .iter()
            .find_map(|(prefix, rt)| name.strip_prefix(prefix).filter(|id| is_hex_id(id)).map(|id| (*rt, id)))
        {
            container = Some((Some(runtime), id));
            break;
        }
        // cgroupfs drivers: a bare id under /docker/ or under a pod directory.
        if is_hex_id(name) {
            let parent = i.checked_sub(1).map(|j| parts[j]).unwrap_or("");
            let runtime = (parent == "docker").then_some("docker");
            container = Some((runtime, name));
            break;
        }
    }
    if let Some((runtime, id)) = container {
        out.push(Selector::new("cgroup", format!("container-id:{id}")));
        if let Some(rt) = runtime {
            out.push(Selector::new("cgroup", format!("container-runtime:{rt}")));
        }
    }

    // Kubernetes: kubepods[.slice] / [qos] / pod<uid>, in either driver's spelling.
    if let Some(k) =
        parts.iter().position(|p| *p == "kubepods" || *p == "kubepods.slice" || p.ends_with("-kubepods.slice"))
    {
        let rest = &parts[k + 1..];
        let mut qos = "guaranteed";
        for part in rest {
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

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1a6cfa9b2c1e3d5f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e";
    const UID: &str = "7b3d2a10-9c8e-4f6a-b5d4-3c2b1a0f9e8d";

    fn sel(path: &str) -> Vec<String> {
        cgroup_selectors(path).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn real_world_cgroup_layouts() {
        let uid_ = UID.replace('-', "_");
        let cases: Vec<(String, Vec<String>)> = vec![
            // systemd service
            ("/system.slice/nginx.service".into(), vec!["systemd:id:nginx.service".into()]),
            // user service under user@.service
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service".into(),
                vec!["systemd:id:foo.service".into()],
            ),
            // delegated subtree below a service
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
    fn conmon_and_plain_paths_name_no_container() {
        let got = sel(&format!("/kubepods.slice/kubepods-besteffort.slice/x-pod1.slice/crio-conmon-{ID}.scope"));
        assert!(!got.iter().any(|s| s.starts_with("cgroup:container-id")), "{got:?}");
        let got = sel("/tether-test-x/leaf");
        assert_eq!(got, vec!["cgroup:path:/tether-test-x/leaf".to_string()]);
        let got = sel("/");
        assert_eq!(got, vec!["cgroup:path:/".to_string()]);
    }
}
