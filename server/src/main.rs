//! `kindling-server`: serves the Ember API over the shipped model, SAE and atlas, and the
//! playground. See the crate docs in `lib.rs` and the README for the SDK set-up.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use kindling_ember::wire::Limits;
use kindling_ember::{Ember, MODEL_NAME};
use kindling_engine::{Atlas, Backend, Model, Sae};
use kindling_server::{AppState, Settings, serve, upstream};
use sha2::{Digest, Sha256};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Kindling's hosted Ember endpoint (Goodfire API and OpenAI-style chat) and playground server"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The GGUF model file.
    #[arg(long, default_value = "public/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// The model name requests must carry.
    #[arg(long, default_value = MODEL_NAME)]
    model_name: String,
    #[arg(long, default_value = "public/sae")]
    sae_dir: PathBuf,
    #[arg(long, default_value = "public/atlas")]
    atlas_dir: PathBuf,
    /// Accepted API keys (comma-separated); none: no key needed (then only a loopback host is allowed).
    #[arg(long, env = "KINDLING_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_key: Vec<String>,
    /// A file of accepted API keys, one per line (so that keys need not be on the command line).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// An origin whose web pages may call the API (CORS), e.g. https://example.org; repeatable.
    /// None: only this server's own pages. '*' (any origin) needs an API key.
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// A host name this server answers for besides localhost, 127.0.0.1, [::1] and the address
    /// it was reached at (e.g. the name a load balancer forwards); repeatable.
    #[arg(long = "allowed-host")]
    allowed_hosts: Vec<String>,
    /// Connections open at once; more wait to be accepted.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds a connection has to send a request's headers.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Model operations running at once.
    #[arg(long, default_value_t = 2)]
    max_running: usize,
    /// Requests waiting for a slot before the server answers 429.
    #[arg(long, default_value_t = 16)]
    max_queued: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    max_body_bytes: usize,
    /// Longest conversation, in tokens.
    #[arg(long, default_value_t = 4096)]
    max_prompt_tokens: usize,
    /// Most tokens one completion generates (larger requests are lowered to this).
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
    /// Serve the API from a hosted provider instead of the local model: `neuronpedia` (Llama-3.3-70B
    /// with Goodfire's SAE) or `neuronpedia:MODEL/SOURCE` (any public Neuronpedia pair).
    #[arg(long)]
    upstream: Option<String>,
    /// The upstream's base URL (tests point it at the contract double).
    #[arg(long, default_value = kindling_ember::neuronpedia::BASE_URL)]
    upstream_url: String,
    /// A file holding the Neuronpedia API key sent as x-api-key (else NEURONPEDIA_API_KEY; none
    /// is needed for public models).
    #[arg(long)]
    upstream_key_file: Option<PathBuf>,
    /// Directories served at `/`, first match wins.
    #[arg(long = "static", default_values = ["dist", "public"])]
    static_dirs: Vec<PathBuf>,
}

fn main() {
    // One JSON line per event on stderr (RUST_LOG picks the level; info by default).
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("kindling-server: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(Args::parse()));
    // Model work in flight was cancelled at shutdown and stops at its next check; do not wait
    // for longer than that on a blocking thread.
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Err(e) = result {
        error!("kindling-server: {e}");
        std::process::exit(1);
    }
    info!("kindling-server: stopped");
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut keys = args.api_key;
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the API key file {}: {e}", path.display()))?;
        keys.extend(text.lines().map(str::to_string));
    }
    let api_keys: Vec<String> = keys.into_iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect();
    if api_keys.is_empty() && !args.host.is_loopback() {
        return Err(format!(
            "refusing to serve {} without an API key: pass --api-key or KINDLING_API_KEYS",
            args.host
        )
        .into());
    }
    let settings = Settings {
        api_keys,
        max_running: args.max_running,
        max_queued: args.max_queued,
        max_body_bytes: args.max_body_bytes,
        static_dirs: args.static_dirs.into_iter().filter(|d| d.is_dir()).collect(),
        cors_origins: args.cors_origins,
        allowed_hosts: args.allowed_hosts,
        max_connections: args.max_connections,
        header_read_timeout: Duration::from_secs(args.header_timeout.max(1)),
    };
    settings.check()?;
    if let Some(spec) = &args.upstream {
        let source = upstream::parse_upstream(spec)?;
        let key = match &args.upstream_key_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the upstream key file {}: {e}", path.display()))?
                .trim()
                .to_string(),
            None => std::env::var("NEURONPEDIA_API_KEY").unwrap_or_default().trim().to_string(),
        };
        let keyed = !key.is_empty();
        let upstream = upstream::upstream(source.clone(), Some(&args.upstream_url), upstream::Secret::new(key))?;
        info!(
            "kindling-server: answering through Neuronpedia ({}) at {}{}",
            source.spec(),
            args.upstream_url,
            if keyed { " with an API key" } else { "" }
        );
        let state = AppState::with_backend(kindling_server::Backend::Neuronpedia(std::sync::Arc::new(upstream)), settings);
        return listen(state, args.host, args.port).await;
    }
    info!("kindling-server: loading {}", args.model.display());
    let model = Model::load(&args.model, Backend::Cpu)?;
    let sae_file = args.sae_dir.join("kindling-sae.f16.safetensors");
    let sae = Sae::from_compact(&std::fs::read(&sae_file).map_err(|e| format!("cannot read {}: {e}", sae_file.display()))?)?;
    // An SAE trained on another model would steer nonsense: refuse to start.
    let model_sha256 = sha256_file(&args.model)?;
    sae.check_model(model.llama.config(), Some(model_sha256.as_str()))
        .map_err(|e| format!("{} does not belong to {}: {e}", sae_file.display(), args.model.display()))?;
    let atlas = Atlas::load_dir(&args.atlas_dir, &sae, true)?;
    let mut ember = Ember::new(model, sae, atlas, args.model_name);
    ember.limits = Limits {
        max_prompt_tokens: args.max_prompt_tokens,
        max_new_tokens: args.max_new_tokens,
        ..Limits::default()
    };
    listen(AppState::new(ember, settings), args.host, args.port).await
}

/// Serves `state` at `host:port` until Ctrl-C or SIGTERM.
async fn listen(state: AppState, host: IpAddr, port: u16) -> Result<(), Box<dyn std::error::Error>> {
    let keyed = state.keyed();
    let address = SocketAddr::new(host, port);
    let listener = tokio::net::TcpListener::bind(address).await?;
    info!(
        "kindling-server: listening on http://{} (Goodfire base_url; OpenAI base_url http://{0}/api/inference/v1){}",
        listener.local_addr()?,
        if keyed { ", API key required" } else { "" }
    );
    serve(listener, state, shutdown(), Duration::from_secs(3)).await?;
    Ok(())
}

/// SHA-256 (hex) of a file, read in blocks.
fn sha256_file(path: &Path) -> Result<String, String> {
    let fail = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(fail)?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).map_err(fail)?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Resolves on Ctrl-C or SIGTERM; then model work in flight is cancelled and open
/// connections get a few seconds to finish.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    info!("kindling-server: shutting down");
}
