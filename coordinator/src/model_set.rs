//! The models an etcd cluster serves besides its base model: each has its plan at
//! `models/<id>` in etcd (committed by the admin API's load, re-planned by the driver), and
//! every coordinator serves what etcd holds: [`follow`] attaches to each committed plan, and
//! stops routing to a model whose plan is gone (unloaded through another coordinator).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cluster_registry::Registry;
use common::gguf::GgufFile;
use common::tokenizer::TextTokenizer;
use proto_types::registry::{Decision, PlanRecord};
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ModelRef};
use crate::error::{CoordError, Result};
use crate::follow::{Complaint, EVERY};
use crate::http::{AppState, ServedModel};
use crate::serving::Serving;

/// A model file, read: what planning and serving it need.
#[derive(Debug)]
pub struct ModelFile {
    /// Its layers' sizes and hash; served beside other models.
    pub model: Arc<ModelRef>,
    /// Its tokenizer.
    pub tok: Arc<TextTokenizer>,
    /// Its context bound, capped by the one asked for.
    pub max_ctx: usize,
}

impl ModelFile {
    /// Reads `path` (its header and tokenizer, and hashes it: off the async workers).
    pub async fn read(path: PathBuf, max_ctx: usize) -> Result<Self> {
        tokio::task::spawn_blocking(move || {
            let f = GgufFile::open(&path)?;
            let tok = TextTokenizer::from_gguf(&f)?;
            let max_ctx = max_ctx.min(f.config()?.context_length);
            let mut model = ModelRef::inspect(&path)?;
            model.beside = true;
            Ok(ModelFile {
                model: Arc::new(model),
                tok: Arc::new(tok),
                max_ctx,
            })
        })
        .await
        .map_err(|e| CoordError::Plan(format!("reading a model file: {e}")))?
    }
}

/// The model files plans name, each read once.
#[derive(Debug)]
pub struct ModelFiles {
    dir: PathBuf,
    read: HashMap<String, Arc<ModelFile>>,
}

impl ModelFiles {
    /// Files in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        ModelFiles {
            dir,
            read: HashMap::new(),
        }
    }

    /// The file `plan` serves, checked against the plan's hash.
    pub async fn get(&mut self, plan: &PlanRecord) -> Result<Arc<ModelFile>> {
        if let Some(f) = self.read.get(&plan.model) {
            if f.model.sha256 == plan.sha256 {
                return Ok(f.clone());
            }
        }
        let path = safe_join(&self.dir, &plan.model)?;
        let f = Arc::new(ModelFile::read(path, plan.max_ctx as usize).await?);
        if f.model.sha256 != plan.sha256 {
            return Err(CoordError::Plan(format!(
                "plan {} serves {} with sha256 {}, but {} here has {}",
                plan.epoch,
                plan.model,
                plan.sha256,
                self.dir.join(&plan.model).display(),
                f.model.sha256
            )));
        }
        self.read.insert(plan.model.clone(), f.clone());
        Ok(f)
    }
}

/// `dir/file` when `file` is a plain file name.
fn safe_join(dir: &Path, file: &str) -> Result<PathBuf> {
    if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
        return Err(CoordError::Plan(format!(
            "`{file}` is not a file name in the models folder"
        )));
    }
    Ok(dir.join(file))
}

/// Follows `models/` in etcd until `stop`: serves each committed plan there (a newer epoch
/// replaces the older for the requests after), and stops serving a model whose plan is gone.
/// `base` is the model `--model` names, which is not in `models/`.
pub async fn follow(
    registry: Registry,
    state: Arc<AppState>,
    dir: PathBuf,
    drain: Duration,
    stop: CancellationToken,
) {
    let mut files = ModelFiles::new(dir);
    let mut complaint = Complaint::default();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // one change at a time with the admin API's loads and unloads, read under it
        let _one = state.changing.lock().await;
        let plans = match registry.models().await {
            Ok((plans, bad)) => {
                if !bad.is_empty() {
                    complaint.error(format!("ignoring model records: {}", bad.join("; ")));
                }
                plans
            }
            Err(e) => {
                complaint.error(format!("reading the models in etcd: {e}"));
                continue;
            }
        };
        let base = state.models().first().map(|m| m.id.clone());
        let gone: Vec<Arc<ServedModel>> = {
            let mut models = state.models.write().unwrap_or_else(|e| e.into_inner());
            let (keep, gone) = std::mem::take(&mut *models)
                .into_iter()
                .partition(|m| Some(&m.id) == base.as_ref() || plans.iter().any(|p| p.id == m.id));
            *models = keep;
            gone
        };
        for m in gone {
            tracing::info!(model = %m.id, "unloaded in etcd: no longer served");
            tokio::spawn(crate::http::admin::retire(m, drain));
        }
        for p in &plans {
            let served = state.models().into_iter().find(|m| m.id == p.id);
            let epoch = served.as_ref().and_then(|m| m.serving.epoch());
            if epoch.is_some_and(|e| e >= p.plan.epoch) {
                continue;
            }
            match registry.decision(p.plan.epoch).await {
                Ok(Some(d)) if d.decision == Decision::Commit => {}
                Ok(_) => {
                    complaint.error(format!(
                        "ignoring the plan of {}: epoch {} has no COMMIT decision",
                        p.id, p.plan.epoch
                    ));
                    continue;
                }
                Err(e) => {
                    complaint.error(format!("reading the decision of {}: {e}", p.plan.epoch));
                    continue;
                }
            }
            let attached = async {
                let f = files.get(&p.plan).await?;
                let c = Cluster::attach(&p.plan, f.model.clone()).await?;
                Ok::<_, CoordError>((f, c))
            };
            match attached.await {
                Ok((f, c)) => match served {
                    Some(m) => {
                        m.serving.replace(Arc::new(c));
                    }
                    None => {
                        let serving = Arc::new(Serving::default());
                        serving.replace(Arc::new(c));
                        let m = ServedModel::new(p.id.clone(), serving, f.tok.clone());
                        state
                            .models
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Arc::new(m));
                        tracing::info!(model = %p.id, epoch = %p.plan.epoch, "serving a model loaded in etcd");
                    }
                },
                Err(e) => complaint.error(format!("serving {} (plan {}): {e}", p.id, p.plan.epoch)),
            }
        }
    }
}
