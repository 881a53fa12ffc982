//! The body of one guarded response: buffered and rewritten, streamed past the cap, blanked
//! when it is not HTML, finished when trailers end it. The shell reads the bytes this asks for
//! and applies the [`BodyStep`] it returns.

use crate::stats::PageGuardStat;

use super::config::PageGuardConfig;
use super::html::{Blanker, Rewriter};
use super::plan::{BodyPlan, NonceText, Outcome, ResponsePlan};

/// One response's body state, from its [`ResponsePlan`] to its last byte.
#[derive(Default)]
pub struct PageBody {
    plan: BodyPlan,
    nonce: Option<NonceText>,
    path: String,
    rewriter: Option<Rewriter>,
    blanker: Option<Blanker>,
}

/// What the shell does after one body event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BodyStep {
    /// Replace the first `.0` bytes of the body buffer with `.1`.
    pub replace: Option<(usize, Vec<u8>)>,
    /// Set (`Some(Some(len))`) or remove (`Some(None)`) the response's `content-length`.
    pub content_length: Option<Option<usize>>,
    /// Keep buffering: the body is not complete yet (`Flow::Stop`).
    pub hold: bool,
    /// Count each.
    pub stats: Vec<PageGuardStat>,
    /// Log this as a denial line.
    pub denial: Option<String>,
}

impl PageBody {
    /// The body of a response planned as `plan`, on page `path` (`:path`).
    pub fn new(plan: &ResponsePlan, path: &str) -> Self {
        PageBody {
            plan: plan.body,
            nonce: plan.nonce.clone(),
            path: path.to_string(),
            rewriter: None,
            blanker: None,
        }
    }

    /// The body's plan now (it changes: a buffer over the cap streams, an ended body is done).
    pub fn plan(&self) -> BodyPlan {
        self.plan
    }

    /// A body chunk: `size` bytes buffered so far (`Buffer`) or in this chunk; `read` reads
    /// them, only when they are needed.
    pub fn chunk(
        &mut self,
        config: &PageGuardConfig,
        size: usize,
        end: bool,
        read: impl FnOnce() -> Vec<u8>,
    ) -> BodyStep {
        let mut step = BodyStep::default();
        match self.plan {
            BodyPlan::Untouched => {}
            BodyPlan::Buffer if end => {
                let out = self.rewrite(config, &read(), true, &mut step);
                step.content_length = Some(Some(out.len()));
                step.replace = Some((size, out));
                self.plan = BodyPlan::Untouched;
            }
            BodyPlan::Buffer if size > config.max_body_bytes => {
                // Over the cap: what is buffered goes out rewritten, the rest streams.
                step.stats.push(PageGuardStat::Outcome(Outcome::OverCap));
                let out = self.rewrite(config, &read(), false, &mut step);
                step.content_length = Some(None);
                step.replace = Some((size, out));
                self.plan = BodyPlan::Stream;
            }
            BodyPlan::Buffer => step.hold = true,
            BodyPlan::Stream => {
                let out = self.rewrite(config, &read(), end, &mut step);
                step.replace = Some((size, out));
                if end {
                    self.plan = BodyPlan::Untouched;
                }
            }
            BodyPlan::Blank => {
                if let Some(out) = self.blank(config, &read(), end, &mut step) {
                    step.replace = Some((size, out));
                }
                if end {
                    self.plan = BodyPlan::Untouched;
                }
            }
        }
        step
    }

    /// Trailers end the body: its last chunk did not say `end_of_stream`. A buffered body is
    /// complete now and is rewritten here (`read` reads all of it), never forwarded as it came.
    pub fn trailers(
        &mut self,
        config: &PageGuardConfig,
        read: impl FnOnce() -> Vec<u8>,
    ) -> BodyStep {
        let mut step = BodyStep::default();
        match self.plan {
            BodyPlan::Untouched => {}
            BodyPlan::Buffer => {
                let body = read();
                let out = self.rewrite(config, &body, true, &mut step);
                step.content_length = Some(Some(out.len()));
                step.replace = Some((body.len(), out));
            }
            BodyPlan::Stream => {
                // The chunks went out as they came; no body can follow trailers. All the
                // rewriter still holds is an unfinished start tag (which a browser drops at the
                // end of a document too) or the start of a placeholder: it is dropped, counted.
                if !self.rewrite(config, &[], true, &mut step).is_empty() {
                    step.stats.push(PageGuardStat::TrailersTailDropped);
                }
            }
            BodyPlan::Blank => {
                // All a blanker holds back is the start of a placeholder: dropped, counted.
                if self
                    .blank(config, &[], true, &mut step)
                    .is_some_and(|out| !out.is_empty())
                {
                    step.stats.push(PageGuardStat::TrailersTailDropped);
                }
            }
        }
        self.plan = BodyPlan::Untouched;
        step
    }

    /// Rewrite `data` (the whole buffered body, or one chunk when streaming).
    fn rewrite(
        &mut self,
        config: &PageGuardConfig,
        data: &[u8],
        end: bool,
        step: &mut BodyStep,
    ) -> Vec<u8> {
        let params = config.rewrite_params(self.nonce.as_ref(), &self.path);
        let rewriter = self.rewriter.get_or_insert_with(Rewriter::new);
        let mut out = Vec::with_capacity(data.len() + 256);
        rewriter.feed(&params, data, &mut out);
        if end {
            rewriter.finish(&params, &mut out);
            let stats = rewriter.stats();
            for (n, stat) in [
                (stats.nonces, PageGuardStat::TagsNonce),
                (stats.integrity, PageGuardStat::TagsIntegrity),
                (stats.scrubbed, PageGuardStat::PlaceholderRemoved),
                (stats.oversized_tags, PageGuardStat::OversizedTag),
            ] {
                if n > 0 {
                    step.stats.push(stat);
                }
            }
            if stats.nonce_refused > 0 {
                // A marked tag with a `<` in it or duplicate attributes: what markup injected
                // in front of it looks like. No nonce, the placeholder removed.
                step.stats.push(PageGuardStat::TagsNonceRefused);
                let path = self.path.split('?').next().unwrap_or("");
                step.denial = Some(format!(
                    "refused the nonce to {} marked tag(s) on {path}: `<` or duplicate \
                     attributes in the tag (injected markup?)",
                    stats.nonce_refused
                ));
            }
        }
        out
    }

    /// Blank the placeholder in `data` (a chunk of a body that is not HTML); `None`: the chunk
    /// can pass as it is.
    fn blank(
        &mut self,
        config: &PageGuardConfig,
        data: &[u8],
        end: bool,
        step: &mut BodyStep,
    ) -> Option<Vec<u8>> {
        let placeholder = &config.placeholder;
        let blanker = self.blanker.get_or_insert_with(Blanker::new);
        let mut out = Vec::new();
        let mut changed = blanker.feed(placeholder, data, &mut out);
        if end {
            let before = out.len();
            blanker.finish(placeholder, &mut out);
            changed |= out.len() != before;
            if blanker.blanked() > 0 {
                step.stats.push(PageGuardStat::PlaceholderRemoved);
            }
        }
        changed.then_some(out)
    }
}
