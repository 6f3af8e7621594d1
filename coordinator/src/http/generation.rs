//! The completion and chat handlers: a request checked into a [`GenRequest`] per choice,
//! then run and answered by [`super::respond`].

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;

use super::openai::*;
use super::respond::{serve, Answer, Streaming};
use super::{bad, ApiError, AppState, ServedModel};
use crate::cluster::Cluster;
use crate::engine::GenRequest;
use crate::error::CoordError;

/// The shared fields once checked (`checked`): non-OpenAI fields logged, `logit_bias` ids
/// checked against the vocabulary.
fn with_vocab(st: &ServedModel, c: &Common, checked: Checked) -> Result<Checked, ApiError> {
    let ignored = c.ignored_fields();
    if !ignored.is_empty() {
        tracing::info!(fields = ?ignored, "ignoring request fields that are not OpenAI's");
    }
    let vocab = st.tok.vocab_size();
    if let Some((id, _)) = checked
        .sampling
        .logit_bias
        .iter()
        .find(|(i, _)| *i as usize >= vocab)
    {
        return Err(bad(format!(
            "token id {id} in `logit_bias` is outside the vocabulary of {vocab}"
        )));
    }
    Ok(checked)
}

/// One prompt's generation under `checked`: the prompt tokenized (or its ids checked) and
/// fitted to the context.
fn gen_request(
    st: &ServedModel,
    cluster: &Cluster,
    prompt: &OnePrompt,
    checked: &Checked,
    ignore_eos: bool,
) -> Result<GenRequest, ApiError> {
    let max_tokens = checked.max_tokens;
    let vocab = st.tok.vocab_size();
    let ids = match prompt {
        // The tokenizer failing is the coordinator's problem, not the request's.
        OnePrompt::Text(t) => st.tok.encode(t).map_err(CoordError::from)?,
        OnePrompt::Ids(ids) => {
            if let Some(bad_id) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(bad(format!(
                    "token id {bad_id} in `prompt` is outside the vocabulary of {vocab}"
                )));
            }
            ids.clone()
        }
    };
    if ids.is_empty() {
        return Err(bad("the prompt is empty"));
    }
    if ids.len() + max_tokens > cluster.max_ctx {
        return Err(bad(format!(
            "the prompt ({} tokens) plus max_tokens ({max_tokens}) exceeds the context of {} tokens",
            ids.len(),
            cluster.max_ctx
        )));
    }
    Ok(GenRequest {
        prompt: ids,
        max_tokens,
        sampling: checked.sampling.clone(),
        stop: checked.stop.clone(),
        ignore_eos,
        grammar: checked.grammar.clone(),
    })
}

/// Most choices one request may ask for (prompts times `n`).
pub const MAX_CHOICES: usize = 16;

/// One choice of a response: its index, its generation, and the text echoed before it.
pub(super) struct Choice {
    pub(super) index: usize,
    pub(super) req: GenRequest,
    pub(super) echo: Option<String>,
}

/// A response's choices, `n` per prompt in a row, and its prompt tokens (each prompt once,
/// however many choices it has, as OpenAI counts them).
pub(super) struct Choices {
    pub(super) choices: Vec<Choice>,
    pub(super) n: usize,
    /// Choices answered per prompt: `n`, or with `best_of` the best of the `n` generated.
    pub(super) keep: usize,
    /// Whether the client asked for log-probabilities (`best_of` asks for them itself).
    pub(super) shown_logprobs: bool,
    pub(super) prompt_tokens: usize,
}

/// The choices of `reqs` (one per prompt) times `n`, indexed prompt by prompt as OpenAI does;
/// choice `c` of a prompt samples with `seed + c`, so a seeded request is reproducible and
/// its choices differ.
fn fan_out(reqs: Vec<(GenRequest, Option<String>)>, n: usize) -> Result<Choices, ApiError> {
    if reqs.len() * n > MAX_CHOICES {
        return Err(bad(format!(
            "{} prompts times `n` = {n} asks for {} choices; at most {MAX_CHOICES}",
            reqs.len(),
            reqs.len() * n
        )));
    }
    let mut out = Vec::with_capacity(reqs.len() * n);
    let prompt_tokens = reqs.iter().map(|(r, _)| r.prompt.len()).sum();
    for (req, echo) in reqs {
        for c in 0..n {
            let mut req = req.clone();
            req.sampling.seed = req.sampling.seed.wrapping_add(c as u64);
            out.push(Choice {
                index: out.len(),
                req,
                echo: echo.clone(),
            });
        }
    }
    Ok(Choices {
        choices: out,
        n,
        keep: n,
        shown_logprobs: false,
        prompt_tokens,
    })
}

pub(super) async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let m = st.model(req.common.model.as_deref())?;
    let (id, trace) = st.open_trace(&headers, false, &m.id);
    let run = async {
        let cluster = m.serving.current()?;
        let n = req.common.n().map_err(bad)?;
        let best_of = req.best_of(n).map_err(bad)?;
        let checked = req.common.checked(Endpoint::Completion).map_err(bad)?;
        let mut checked = with_vocab(&m, &req.common, checked)?;
        let asked = checked.sampling.logprobs.is_some();
        if best_of > n && !asked {
            // the candidates are ranked by their tokens' log-probabilities
            checked.sampling.logprobs = Some(0);
        }
        let reqs = {
            let _s = trace.step("tokenize");
            let mut reqs = Vec::new();
            for prompt in req.prompt.all().map_err(bad)? {
                let echo = req.echo_text(&prompt, &m.tok, asked).map_err(bad)?;
                let prompt = match &req.suffix {
                    Some(suffix) if !suffix.is_empty() => fill_in_the_middle(&m, &prompt, suffix)?,
                    _ => prompt,
                };
                let g = gen_request(&m, &cluster, &prompt, &checked, req.common.ignore_eos)?;
                reqs.push((g, echo));
            }
            reqs
        };
        if let Some(grammar) = &checked.grammar {
            m.check_grammar(grammar).await?;
        }
        let stream = Streaming::of(&req.common);
        let mut choices = fan_out(reqs, best_of)?;
        choices.keep = n;
        choices.shown_logprobs = asked;
        serve(
            &st,
            &m,
            cluster,
            choices,
            stream,
            Answer::Text,
            (id, &trace),
        )
        .await
    };
    run.await.inspect_err(|e| trace.failed(e.2))
}

/// The prompt in prefix-suffix-middle order with the model's fill-in-the-middle tokens, as
/// ids; a model without them: 400.
fn fill_in_the_middle(
    st: &ServedModel,
    prompt: &OnePrompt,
    suffix: &str,
) -> Result<OnePrompt, ApiError> {
    let Some((pre, suf, mid)) = st.tok.fim_tokens() else {
        return Err(bad(
            "`suffix` needs a model with fill-in-the-middle tokens; this one has none",
        ));
    };
    let enc = |t: &str| st.tok.encode_with(t, false).map_err(CoordError::from);
    let prefix = match prompt {
        OnePrompt::Text(t) => enc(t)?,
        OnePrompt::Ids(ids) => ids.clone(),
    };
    let mut ids = vec![pre];
    ids.extend(prefix);
    ids.push(suf);
    ids.extend(enc(suffix)?);
    ids.push(mid);
    Ok(OnePrompt::Ids(ids))
}

pub(super) async fn chat(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let m = st.model(req.common.model.as_deref())?;
    let (id, trace) = st.open_trace(&headers, true, &m.id);
    let run = async {
        let cluster = m.serving.current()?;
        let mut checked = with_vocab(&m, &req.common, req.checked().map_err(bad)?)?;
        let n = req.common.n().map_err(bad)?;
        let template = m
            .tok
            .chat_template()
            .ok_or_else(|| bad("the model has no chat template; use /v1/completions"))?;
        // tools shown to the model, and the syntax its calls are read in
        let tools = req.tools().map_err(bad)?.filter(Tools::active);
        let syntax = match &tools {
            Some(t) => {
                let syntax = template.tool_syntax().map_err(bad)?;
                if let Some(g) = t.grammar(syntax) {
                    checked.grammar = Some(common::grammar::Grammar::Lark(g));
                }
                Some(syntax)
            }
            None => None,
        };
        let g = {
            let _s = trace.step("chat template and tokenize");
            let messages = req.chat_messages().map_err(bad)?;
            let prompt = template
                .render_with_tools(&messages, tools.as_ref().map(|t| &t.list), true)
                .map_err(|e| bad(e.to_string()))?;
            let prompt = OnePrompt::Text(prompt);
            gen_request(&m, &cluster, &prompt, &checked, req.common.ignore_eos)?
        };
        if let Some(grammar) = &checked.grammar {
            m.check_grammar(grammar).await?;
        }
        let stream = Streaming::of(&req.common);
        let mut choices = fan_out(vec![(g, None)], n)?;
        choices.shown_logprobs = checked.sampling.logprobs.is_some();
        serve(
            &st,
            &m,
            cluster,
            choices,
            stream,
            Answer::Chat(syntax),
            (id, &trace),
        )
        .await
    };
    run.await.inspect_err(|e| trace.failed(e.2))
}
