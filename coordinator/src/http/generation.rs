//! The completion and chat handlers: a request checked into a [`GenRequest`], run by the
//! engine, answered whole or as Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::generate::FinishReason;
use futures::Stream;
use serde_json::{json, Value};

use super::openai::{self, *};
use super::trace::RequestSpan;
use super::{bad, now, ApiError, AppState};
use crate::cluster::Cluster;
use crate::engine::{self, GenEvent, GenRequest};
use crate::error::CoordError;

fn gen_request(
    st: &AppState,
    cluster: &Cluster,
    prompt: &OnePrompt,
    c: &Common,
    at: Endpoint,
) -> Result<GenRequest, ApiError> {
    let Checked {
        max_tokens,
        sampling,
        stop,
        grammar,
    } = c.checked(at).map_err(bad)?;
    let ignored = c.ignored_fields();
    if !ignored.is_empty() {
        tracing::info!(fields = ?ignored, "ignoring request fields that are not OpenAI's");
    }
    let vocab = st.tok.vocab_size();
    if let Some((id, _)) = sampling
        .logit_bias
        .iter()
        .find(|(i, _)| *i as usize >= vocab)
    {
        return Err(bad(format!(
            "token id {id} in `logit_bias` is outside the vocabulary of {vocab}"
        )));
    }
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
        sampling,
        stop,
        ignore_eos: c.ignore_eos,
        grammar,
    })
}

pub(super) async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let (id, trace) = st.open_trace(&headers, false);
    let run = async {
        let cluster = st.serving.current()?;
        let g = {
            let _s = trace.step("tokenize");
            let prompt = req.prompt.single().map_err(bad)?;
            gen_request(&st, &cluster, &prompt, &req.common, Endpoint::Completion)?
        };
        if let Some(grammar) = &g.grammar {
            st.check_grammar(grammar).await?;
        }
        let stream = Streaming::of(&req.common);
        serve(&st, cluster, g, stream, false, id, &trace).await
    };
    run.await.inspect_err(|e| trace.failed(e.2))
}

pub(super) async fn chat(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let (id, trace) = st.open_trace(&headers, true);
    let run = async {
        let cluster = st.serving.current()?;
        req.checked().map_err(bad)?;
        let g = {
            let _s = trace.step("chat template and tokenize");
            let messages = req.chat_messages().map_err(bad)?;
            let prompt = st
                .tok
                .apply_chat_template(&messages)
                .map_err(|e| bad(e.to_string()))?;
            gen_request(
                &st,
                &cluster,
                &OnePrompt::Text(prompt),
                &req.common,
                Endpoint::Chat,
            )?
        };
        if let Some(grammar) = &g.grammar {
            st.check_grammar(grammar).await?;
        }
        let stream = Streaming::of(&req.common);
        serve(&st, cluster, g, stream, true, id, &trace).await
    };
    run.await.inspect_err(|e| trace.failed(e.2))
}

/// One streamed chunk: a piece of text (none in the last chunk) with its `logprobs` (`null`
/// unless asked for).
fn chunk(
    chat: bool,
    id: &str,
    model: &str,
    text: Option<&str>,
    logprobs: Value,
    finish: Option<FinishReason>,
) -> Value {
    let f = finish.map(FinishReason::as_str);
    if chat {
        let delta = text.map_or(json!({}), |t| json!({"role": "assistant", "content": t}));
        json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": f}]})
    } else {
        json!({"id": id, "object": "text_completion", "created": now(), "model": model,
               "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs,
                            "finish_reason": f}]})
    }
}

/// How a response is sent: whole, or as Server-Sent Events (with a usage chunk at the end
/// when the client asked for one).
#[derive(Debug, Clone, Copy)]
struct Streaming {
    on: bool,
    usage: bool,
}

impl Streaming {
    fn of(c: &Common) -> Self {
        Streaming {
            on: c.stream,
            usage: c.include_usage(),
        }
    }
}

async fn serve(
    st: &AppState,
    cluster: Arc<Cluster>,
    g: GenRequest,
    stream: Streaming,
    chat: bool,
    id: String,
    trace: &RequestSpan,
) -> Result<Response, ApiError> {
    trace.request(&g);
    let asked = g.sampling.logprobs.is_some();
    let tok = st.tok.clone();
    let permit = st
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::from(CoordError::Busy("too many requests in flight".into())))?;
    let trace = trace.clone();
    let admitted = {
        let t = trace.clone();
        move || t.admitted()
    };
    let mut rx = engine::start(
        st.serving.clone(),
        cluster,
        st.tok.clone(),
        g,
        trace.span.clone(),
        admitted,
    );
    if stream.on {
        let model = st.model_id.clone();
        // With `include_usage`, every chunk carries `usage` (null but in the last).
        let with_usage = move |mut c: Value| {
            if stream.usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let s = async_stream(move |tx| async move {
            let _permit = permit;
            let mut offset = 0;
            while let Some(ev) = rx.recv().await {
                let ev = match ev {
                    GenEvent::Piece(p) => {
                        trace.first_text();
                        let lp =
                            openai::logprobs::field(&tok, chat, asked, &p.logprobs, &mut offset);
                        let c = with_usage(chunk(chat, &id, &model, Some(&p.text), lp, None));
                        Event::default().data(c.to_string())
                    }
                    GenEvent::Done {
                        finish,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        trace.done(finish, prompt_tokens, completion_tokens);
                        let c =
                            with_usage(chunk(chat, &id, &model, None, Value::Null, Some(finish)));
                        let _ = tx.send(Event::default().data(c.to_string())).await;
                        if stream.usage {
                            let object = if chat {
                                "chat.completion.chunk"
                            } else {
                                "text_completion"
                            };
                            let usage = Usage {
                                prompt_tokens,
                                completion_tokens,
                                total_tokens: prompt_tokens + completion_tokens,
                            };
                            let last = json!({"id": id, "object": object, "created": now(),
                                "model": model, "choices": [], "usage": usage});
                            let _ = tx.send(Event::default().data(last.to_string())).await;
                        }
                        let _ = tx.send(Event::default().data("[DONE]")).await;
                        return;
                    }
                    GenEvent::Error(e) => {
                        let ApiError(code, message, kind) = ApiError::from(e);
                        trace.failed(kind);
                        let body = json!({"error": {"message": message, "type": kind, "code": code.as_u16()}});
                        let _ = tx
                            .send(Event::default().event("error").data(body.to_string()))
                            .await;
                        return;
                    }
                };
                if tx.send(ev).await.is_err() {
                    return; // client gone: dropping `rx` stops the generation
                }
            }
        });
        return Ok(Sse::new(s).into_response());
    }
    let _permit = permit;
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Piece(p) => {
                trace.first_text();
                text.push_str(&p.text);
                logprobs.extend(p.logprobs);
            }
            GenEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                trace.done(finish, prompt_tokens, completion_tokens);
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                };
                let lp = openai::logprobs::field(&tok, chat, asked, &logprobs, &mut 0);
                let choice = if chat {
                    json!({"index": 0, "message": {"role": "assistant", "content": text},
                           "logprobs": lp, "finish_reason": finish.as_str()})
                } else {
                    json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish.as_str()})
                };
                let obj = if chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Ok(Json(
                    json!({"id": id, "object": obj, "created": now(), "model": st.model_id,
                                      "choices": [choice], "usage": usage}),
                )
                .into_response());
            }
            GenEvent::Error(e) => {
                let e = ApiError::from(e);
                trace.failed(e.2);
                return Err(e);
            }
        }
    }
    Err(ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation ended without a result".into(),
        "server_error",
    ))
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(f(tx));
    let guard = AbortOnDrop(task);
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), move |e| {
        let _ = &guard;
        Ok(e)
    })
}

/// Aborts the feeding task when the response stream is dropped (the client went away).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
