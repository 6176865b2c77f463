//! A Workload API client for operators (`tether-agent api fetch ...`) and tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tether_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
    Request, Status,
};

pub type Client = SpiffeWorkloadApiClient<InterceptedService<Channel, fn(Request<()>) -> Result<Request<()>, Status>>>;

fn header(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.metadata_mut().insert("workload.spiffe.io", MetadataValue::from_static("true"));
    Ok(req)
}

/// Connects to the socket; every request carries the `workload.spiffe.io: true` header.
pub async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    let channel = Endpoint::from_static("http://workload.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(channel, header as fn(Request<()>) -> Result<Request<()>, Status>))
}
