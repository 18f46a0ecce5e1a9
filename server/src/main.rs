//! `kindling-server`: serves the Ember API over the shipped model, SAE and atlas, and the
//! playground. See the crate docs in `lib.rs` and the README for the SDK set-up.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use kindling_engine::ember::{Ember, Limits};
use kindling_engine::{Atlas, Backend, Model, Sae};
use kindling_server::{AppState, Settings, router};

/// The name requests use for the model Kindling ships.
const MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

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
    /// Directories served at `/`, first match wins.
    #[arg(long = "static", default_values = ["dist", "public"])]
    static_dirs: Vec<PathBuf>,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("kindling-server: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let api_keys: Vec<String> = args
        .api_key
        .into_iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    if api_keys.is_empty() && !args.host.is_loopback() {
        return Err(format!(
            "refusing to serve {} without an API key: pass --api-key or KINDLING_API_KEYS",
            args.host
        )
        .into());
    }
    eprintln!("kindling-server: loading {}", args.model.display());
    let model = Model::load(&args.model, Backend::Cpu)?;
    let sae = Sae::from_compact(&std::fs::read(args.sae_dir.join("kindling-sae.f16.safetensors"))?)?;
    let atlas = Atlas::load_dir(&args.atlas_dir, &sae, true)?;
    let mut ember = Ember::new(model, sae, atlas, args.model_name);
    ember.limits = Limits {
        max_prompt_tokens: args.max_prompt_tokens,
        max_new_tokens: args.max_new_tokens,
        ..Limits::default()
    };
    let settings = Settings {
        api_keys,
        max_running: args.max_running,
        max_queued: args.max_queued,
        max_body_bytes: args.max_body_bytes,
        static_dirs: args.static_dirs.into_iter().filter(|d| d.is_dir()).collect(),
    };
    let keyed = !settings.api_keys.is_empty();
    let app = router(AppState::new(ember, settings));
    let address = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(address).await?;
    eprintln!(
        "kindling-server: listening on http://{} (Goodfire base_url; OpenAI base_url http://{0}/api/inference/v1){}",
        listener.local_addr()?,
        if keyed { ", API key required" } else { "" }
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown()).await?;
    eprintln!("kindling-server: stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM; requests in flight finish first.
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
    eprintln!("kindling-server: shutting down");
}
