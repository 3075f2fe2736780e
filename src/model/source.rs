//! Finding a model's files: a local directory, a preset under `models/`, or a Hugging Face hub id.

use super::config::LlamaConfig;
use super::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The files of one model, with its config and (if it has one) tokenizer already parsed.
#[derive(Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub tokenizer: Option<Tokenizer>,
    /// The hub id when `dir` is a hub snapshot (weights are fetched on first load).
    pub hub_id: Option<String>,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles")
            .field("dir", &self.dir)
            .field("hub_id", &self.hub_id)
            .field("has_tokenizer", &self.tokenizer.is_some())
            .finish()
    }
}

/// Hub files a model needs besides its weights (all but config.json optional).
const METADATA_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// A download that receives no bytes for this long fails instead of hanging.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

impl ModelFiles {
    /// `name_or_dir` is a directory with `config.json`; else a preset name under
    /// `$TANDEM_MODELS_DIR`, `./models` or this repository's `models/`; else a hub id `org/name`.
    pub fn resolve(name_or_dir: &str) -> Result<Self> {
        let path = Path::new(name_or_dir);
        if path.is_dir() {
            return Self::from_dir(path, None);
        }
        for root in preset_roots() {
            let dir = root.join(name_or_dir);
            if !name_or_dir.is_empty() && dir.join("config.json").is_file() {
                return Self::from_dir(&dir, None);
            }
        }
        if looks_like_hub_id(name_or_dir) {
            let dir = download_metadata(name_or_dir)?;
            return Self::from_dir(&dir, Some(name_or_dir.to_string()));
        }
        let roots: Vec<String> = preset_roots()
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        bail!(
            "model `{name_or_dir}` is not a directory, not a preset (looked in {}), nor a hub id `org/name`",
            roots.join(", ")
        )
    }

    /// Reads `dir/config.json` and, if present, the tokenizer files.
    pub fn from_dir(dir: &Path, hub_id: Option<String>) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            bail!("model directory {} has no config.json", dir.display());
        }
        let config = LlamaConfig::from_file(&config_path)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        if let Some(t) = &tokenizer {
            if t.vocab_size() > config.vocab_size {
                tracing::warn!(
                    "{}: the tokenizer has {} ids but the model's vocab_size is {}",
                    dir.display(),
                    t.vocab_size(),
                    config.vocab_size
                );
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            hub_id,
        })
    }

    /// For a hub model, downloads the safetensors files into the snapshot directory (no-op for
    /// local directories and for files already cached).
    pub fn fetch_weights(&self) -> Result<()> {
        let Some(id) = &self.hub_id else {
            return Ok(());
        };
        let index = "model.safetensors.index.json";
        let files = match fetch(id, index) {
            Ok(path) => {
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path)?)
                        .with_context(|| format!("{} is not valid JSON", path.display()))?;
                let map = v.get("weight_map").and_then(|m| m.as_object());
                let mut shards: Vec<String> = map
                    .into_iter()
                    .flat_map(|m| m.values().filter_map(|f| f.as_str().map(str::to_owned)))
                    .collect();
                shards.sort();
                shards.dedup();
                shards
            }
            Err(_) => vec!["model.safetensors".to_string()],
        };
        for file in files {
            fetch(id, &file).with_context(|| hub_hint(id))?;
        }
        Ok(())
    }
}

fn preset_roots() -> Vec<PathBuf> {
    let mut roots = vec![];
    if let Ok(dir) = std::env::var("TANDEM_MODELS_DIR") {
        roots.push(PathBuf::from(dir));
    }
    roots.push(PathBuf::from("models"));
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    roots
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn hub_hint(id: &str) -> String {
    format!(
        "cannot download `{id}` from the Hugging Face hub (offline?); download it elsewhere and pass its local directory to --model"
    )
}

/// Downloads config and tokenizer files of `id`; returns the snapshot directory.
fn download_metadata(id: &str) -> Result<PathBuf> {
    let config = fetch(id, "config.json").with_context(|| hub_hint(id))?;
    for file in &METADATA_FILES[1..] {
        // Optional files: a 404 just means the model has none.
        let _ = fetch(id, file);
    }
    Ok(config.parent().expect("a file has a parent").to_path_buf())
}

/// One file from the hub cache, or downloaded. A stalled download fails after `STALL_TIMEOUT`.
fn fetch(id: &str, file: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if let Some(path) = cache.model(id.to_string()).get(file) {
        return Ok(path);
    }
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true") {
        bail!("{file} of `{id}` is not in the local hub cache and HF_HUB_OFFLINE is set");
    }
    tracing::info!("downloading {file} of `{id}` from the Hugging Face hub");
    let start = Instant::now();
    let progress = Stamp {
        last: Arc::new(AtomicU64::new(0)),
        start,
    };
    let last = progress.last.clone();
    let (tx, rx) = mpsc::channel();
    let (id2, file2) = (id.to_string(), file.to_string());
    // The download runs on its own thread so a stalled connection cannot hang the caller.
    std::thread::spawn(move || {
        let result = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|api| {
                let repo = api.model(id2);
                Ok(repo.download_with_progress(&file2, progress)?)
            });
        let _ = tx.send(result);
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(result) => return result.with_context(|| format!("downloading {file} of `{id}`")),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("download thread for {file} died"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let idle = start.elapsed().as_secs() - last.load(Ordering::Relaxed);
                if idle > STALL_TIMEOUT.as_secs() {
                    bail!(
                        "downloading {file} of `{id}`: no data for {}s",
                        STALL_TIMEOUT.as_secs()
                    );
                }
            }
        }
    }
}

/// Records when (seconds after `start`) the last bytes of a download arrived.
#[derive(Clone)]
struct Stamp {
    last: Arc<AtomicU64>,
    start: Instant,
}

impl hf_hub::api::Progress for Stamp {
    fn init(&mut self, _size: usize, _filename: &str) {
        self.update(0);
    }
    fn update(&mut self, _size: usize) {
        let now = self.start.elapsed().as_secs();
        self.last.store(now, Ordering::Relaxed);
    }
    fn finish(&mut self) {}
}
