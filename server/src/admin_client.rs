//! A client for the admin API's Unix socket (the CLI and tests use it).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tether_proto::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint};

pub async fn connect(socket: &Path) -> Result<AdminClient<Channel>, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://admin.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await?;
    Ok(AdminClient::new(channel))
}
