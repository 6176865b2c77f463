//! Two workloads use their SVIDs, as fetched from the agent, for mutual TLS with rustls; a
//! peer from another trust domain is refused.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use sandbox::{cgroup2_root, require_root, CgroupGuard};
use tether_tests::plane::Plane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fetch(plane: &Plane, cg: &CgroupGuard, dir: &Path) {
    let mut cmd = Command::new(tether_tests::agent_bin());
    cmd.args(["api", "fetch", "x509", "--socket"]).arg(plane.socket()).arg("--write").arg(dir);
    for _ in 0..100 {
        if cg.run(&mut cmd).unwrap().status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no SVID for {}; agent log:\n{}", cg.path().display(), plane.log("agent"));
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path).unwrap().map(Result::unwrap).collect()
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap()
}

fn roots(path: &Path) -> Arc<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(path) {
        store.add(c).unwrap();
    }
    Arc::new(store)
}

fn spiffe_id(cert: &CertificateDer<'_>) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    let san = c.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .find_map(|n| if let x509_parser::extensions::GeneralName::URI(u) = n { Some(u.to_string()) } else { None })
        .unwrap()
}

/// Serves one connection: mutual TLS, then echoes the peer's SPIFFE ID.
async fn serve(listener: tokio::net::TcpListener, svid: &Path) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&svid.join("bundle.0.pem")),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&svid.join("svid.0.pem")), key(&svid.join("svid.0.key")))
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(config)).accept(tcp).await.map_err(|e| e.to_string())?;
    let peer = spiffe_id(&tls.get_ref().1.peer_certificates().unwrap()[0]);
    tls.write_all(peer.as_bytes()).await.map_err(|e| e.to_string())?;
    tls.shutdown().await.map_err(|e| e.to_string())?;
    Ok(peer)
}

async fn connect(port: u16, client: &Path, trust: &Path) -> Result<(String, String), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(trust))
        .with_client_auth_cert(certs(&client.join("svid.0.pem")), key(&client.join("svid.0.key")))
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = ServerName::try_from("web.internal").unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let server = spiffe_id(&tls.get_ref().1.peer_certificates().unwrap()[0]);
    let mut echoed = String::new();
    tls.read_to_string(&mut echoed).await.map_err(|e| e.to_string())?;
    Ok((server, echoed))
}

#[tokio::test(flavor = "multi_thread")]
async fn workloads_do_mutual_tls_with_their_svids() {
    require_root().unwrap();
    let plane = tokio::task::spawn_blocking(|| Plane::start(1)).await.unwrap();
    let (web_cg, api_cg) = (CgroupGuard::new("mtls-web").unwrap(), CgroupGuard::new("mtls-api").unwrap());
    let sel = |cg: &CgroupGuard| {
        format!("cgroup:path:/{}", cg.path().strip_prefix(cgroup2_root().unwrap()).unwrap().display())
    };
    plane.entry("spiffe://example.org/web", &[&sel(&web_cg)], &["--dns", "web.internal"]);
    plane.entry("spiffe://example.org/api", &[&sel(&api_cg)], &[]);
    let (web, api) = (plane.dir.path().join("web"), plane.dir.path().join("api"));
    let (p, w, a, wd, ad) = (&plane, &web_cg, &api_cg, web.clone(), api.clone());
    std::thread::scope(|s| {
        s.spawn(|| fetch(p, w, &wd));
        s.spawn(|| fetch(p, a, &ad));
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let web2 = web.clone();
    let server = tokio::spawn(async move { serve(listener, &web2).await });
    let (server_id, echoed) = connect(port, &api, &api.join("bundle.0.pem")).await.unwrap();
    assert_eq!(server_id, "spiffe://example.org/web");
    assert_eq!(echoed, "spiffe://example.org/api", "the server saw the client's SPIFFE ID");
    assert_eq!(server.await.unwrap().unwrap(), "spiffe://example.org/api");

    // A client holding an SVID of another trust domain is refused by the server.
    let other = tokio::task::spawn_blocking(|| Plane::start(1)).await.unwrap();
    let other_cg = CgroupGuard::new("mtls-other").unwrap();
    other.entry("spiffe://example.org/intruder", &[&sel(&other_cg)], &[]);
    let intruder = other.dir.path().join("intruder");
    let (o, oc, idir) = (&other, &other_cg, intruder.clone());
    std::thread::scope(|s| {
        s.spawn(|| fetch(o, oc, &idir));
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let web3 = web.clone();
    let server = tokio::spawn(async move { serve(listener, &web3).await });
    // The intruder trusts the real bundle (it learned it somehow); its own cert is the problem.
    let result = connect(port, &intruder, &web.join("bundle.0.pem")).await;
    let served = server.await.unwrap();
    assert!(served.is_err(), "server accepted a foreign client: {served:?}");
    assert!(result.is_err() || result.as_ref().is_ok_and(|(_, e)| e.is_empty()), "{result:?}");
}
