//! Artifact generation: the interface the worker drives (plan, generate, repair), and the
//! generators behind it. `offline` builds artifacts from the content text alone; `openai` asks
//! a language model behind any OpenAI-compatible chat-completions server.

mod offline;
mod openai;

pub use offline::OfflineGenerator;
pub use openai::{OpenAiGenerator, OpenAiSettings};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub use crate::events::BoxFuture;

/// Number of options every quiz question carries.
pub const OPTIONS_PER_QUESTION: usize = 4;

/// Which artifact a job produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArtifactType {
    /// Multiple-choice cloze questions.
    Quiz,
    /// Term/explanation study cards.
    Flashcards,
    /// A short summary plus key points.
    Summary,
}

impl ArtifactType {
    /// The wire name: "quiz", "flashcards" or "summary".
    pub fn as_str(&self) -> &'static str {
        match self {
            ArtifactType::Quiz => "quiz",
            ArtifactType::Flashcards => "flashcards",
            ArtifactType::Summary => "summary",
        }
    }

    /// Parses a wire name exactly ("quiz", not "Quiz").
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Quiz, Self::Flashcards, Self::Summary]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

/// What a generator is asked for.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// The artifact to produce.
    pub artifact_type: ArtifactType,
    /// The source text the artifact is built from.
    pub content: String,
    /// Questions (quiz) or cards (flashcards); for summary, the number of key points wanted.
    pub count: usize,
}

/// Why a generator could not produce output (not a validation failure).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationError(pub String);

impl fmt::Display for GenerationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "generation failed: {}", self.0)
    }
}

impl std::error::Error for GenerationError {}

/// Produces artifacts: the offline generator, or a language model (`OpenAiGenerator`).
pub trait ArtifactGenerator: Send + Sync + 'static {
    /// Decides what to generate; the plan is opaque to the worker (JSON).
    fn plan<'a>(
        &'a self,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Value, GenerationError>>;

    /// Produces the artifact JSON from the plan.
    fn generate<'a>(
        &'a self,
        request: &'a GenerationRequest,
        plan: &'a Value,
    ) -> BoxFuture<'a, Result<Value, GenerationError>>;

    /// Produces a corrected artifact, given the previous output and the validator's errors.
    fn repair<'a>(
        &'a self,
        request: &'a GenerationRequest,
        plan: &'a Value,
        output: &'a Value,
        errors: &'a [String],
    ) -> BoxFuture<'a, Result<Value, GenerationError>>;
}

/// Another generator made slower by a fixed delay before each call (`GENERATOR_DELAY_MS`): the
/// offline generator answers at once, a language model in seconds, and what that latency does
/// to jobs (progress, cancels, timeouts, restarts mid-job) is worth seeing and testing.
pub struct DelayedGenerator {
    inner: Arc<dyn ArtifactGenerator>,
    delay: Duration,
}

impl DelayedGenerator {
    /// `inner`, with `delay` added to each of its calls.
    pub fn new(inner: Arc<dyn ArtifactGenerator>, delay: Duration) -> Self {
        DelayedGenerator { inner, delay }
    }
}

impl ArtifactGenerator for DelayedGenerator {
    fn plan<'a>(
        &'a self,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.plan(request).await
        })
    }

    fn generate<'a>(
        &'a self,
        request: &'a GenerationRequest,
        plan: &'a Value,
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.generate(request, plan).await
        })
    }

    fn repair<'a>(
        &'a self,
        request: &'a GenerationRequest,
        plan: &'a Value,
        output: &'a Value,
        errors: &'a [String],
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.repair(request, plan, output, errors).await
        })
    }
}
