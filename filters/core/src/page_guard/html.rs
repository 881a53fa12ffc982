//! A streaming HTML tokenizer that rewrites start tags: the real nonce into tags the upstream
//! marked with the placeholder, `integrity` + `crossorigin` into `<script src>` and
//! `<link rel=stylesheet href>` whose URL is in the SRI manifest.
//!
//! It follows the tokenizer states of the HTML standard that decide where a tag starts and ends:
//! tags with quoted attribute values (a `>` inside quotes does not end a tag), comments (`-->`,
//! `--!>`, `<!-->`), bogus comments and doctypes, raw text (`style`, `textarea`, `title`,
//! `noscript`, …) and script data with its escaped and double-escaped states (a `<script` inside
//! a script's `<!--` does not end at the next `</script>`). Text, comments and script bodies pass
//! through byte for byte. Input comes in chunks; a start tag split across chunks is held back
//! until its `>` (up to [`MAX_TAG_BYTES`], then it passes unchanged).
//!
//! Speed: a tag that is whole in the chunk is read in one loop over the same states
//! (`Rewriter::scan_tag`, tested against the byte-by-byte path), and text and unchanged tags
//! are copied out a run at a time.
//!
//! A second stage removes every remaining occurrence of the placeholder (in a script body, a
//! comment, a tag that is not nonceable, …): the placeholder never reaches the browser.
//!
//! Fail-safe by construction: a nonce is only ever written where the placeholder was, so where
//! this tokenizer and a browser could disagree (foreign content, malformed markup) the worst
//! outcome is a marked tag left without its nonce, never an unmarked one given it.

use super::SriManifest;

/// A start tag longer than this is passed through unchanged.
pub const MAX_TAG_BYTES: usize = 16 * 1024;

/// The nonces of one response: one for scripts, another for styles, so that a nonce read
/// where styles are handled (or injected CSS that learns it) never runs a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonces<'a> {
    /// For `<script>` and script preloads (`<link rel=modulepreload>`, `<link rel=preload
    /// as=script>`): `script-src`.
    pub script: &'a str,
    /// For `<style>` and the other `<link>`s (`rel=stylesheet`, …): `style-src`.
    pub style: &'a str,
}

/// What one response's rewriting uses: fixed per config, plus the nonces of this response.
pub struct RewriteParams<'a> {
    /// The deployment-secret marker (empty: no nonce handling).
    pub placeholder: &'a [u8],
    /// This response's nonces (`None`: the marker is removed, no tag gets a nonce).
    pub nonce: Option<Nonces<'a>>,
    pub sri: Option<&'a SriManifest>,
    /// The request path, for URLs relative to the page.
    pub page_path: &'a str,
}

/// What a rewrite did (for stats).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RewriteStats {
    /// Tags whose placeholder became the nonce.
    pub nonces: u32,
    /// Tags given `integrity` from the manifest.
    pub integrity: u32,
    /// Placeholders removed (not in a nonceable tag's `nonce` attribute).
    pub scrubbed: u32,
    /// Start tags longer than [`MAX_TAG_BYTES`], passed through unchanged.
    pub oversized_tags: u32,
    /// Marked tags refused a nonce: not nonceable (duplicate attributes, or a `<` in the tag,
    /// which is what injected dangling markup looks like), or not a `script`, `style` or
    /// `link`. Their placeholder is removed.
    pub nonce_refused: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// `style`, `xmp`, `iframe`, `noembed`, `noframes`, `noscript`, `textarea`, `title`.
    Text(&'static [u8]),
    Script,
    /// `plaintext`: the rest of the document is text.
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagSt {
    Name,
    BeforeAttrName,
    AttrName,
    AfterAttrName,
    BeforeAttrValue,
    ValueDq,
    ValueSq,
    ValueUnq,
    AfterValueQuoted,
    SelfClosing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Normal,
    LessThan,
    EscapeStart,
    EscapeStartDash,
    Escaped,
    EscapedDash,
    EscapedDashDash,
    EscapedLessThan,
    EndTag,
    EscapedEndTag,
    DoubleEscapeStart,
    DoubleEscapeEnd,
    DoubleEscaped,
    DoubleEscapedDash,
    DoubleEscapedDashDash,
    DoubleEscapedLessThan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    TagOpen,
    EndTagOpen,
    /// After `<!` and this many `-`.
    MarkupDecl(u8),
    /// Just after `<!--` (`>` closes it) / after `<!---`.
    CommentStart,
    CommentStartDash,
    /// Inside a comment: consecutive `-` seen (up to 2), and `--!` seen.
    Comment {
        dashes: u8,
        bang: bool,
    },
    BogusComment,
    /// Inside a start tag (`end == false`, buffered) or an end tag (passed through).
    Tag {
        st: TagSt,
        end: bool,
    },
    /// Inside raw text / RCDATA: `matched` bytes of `</name` seen.
    RawText {
        name: &'static [u8],
        matched: usize,
    },
    Script {
        st: Script,
        /// Letters of "script" matched after `</` (end tags) or `<` (double escapes), and
        /// whether a double-escape name still matches.
        k: usize,
        ok: bool,
    },
    Plaintext,
}

/// How a start tag is rewritten: SRI attributes inserted after its name, the placeholder in
/// its `nonce` value (a span of the tag) replaced by the nonce of its kind.
struct TagEdit {
    insert: Option<String>,
    replace: Option<(usize, usize, NonceKind)>,
}

/// Which of a response's nonces a marked tag gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonceKind {
    Script,
    Style,
}

#[derive(Debug, Clone, Copy)]
struct Attr {
    name: (usize, usize),
    value: Option<(usize, usize)>,
}

/// The streaming rewriter for one response body.
pub struct Rewriter {
    state: State,
    /// The start tag being read (from its `<`), while it is not oversized.
    tag: Vec<u8>,
    oversized: bool,
    /// The current tag's name, lowercased (up to 16 bytes; `name_long` when longer).
    name: [u8; 16],
    name_len: usize,
    name_long: bool,
    attrs: Vec<Attr>,
    /// Stage 2: output not yet checked for a placeholder that may continue in the next chunk.
    pending: Vec<u8>,
    /// Stage 2: the last bytes already let out (one fewer than the placeholder): removing a
    /// placeholder can join them with what follows into another one.
    sent: Vec<u8>,
    /// The last bytes of the body as it came (one fewer than the placeholder), to tell at
    /// `finish` whether it was cut inside a placeholder.
    raw_tail: Vec<u8>,
    stats: RewriteStats,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0c | b'\r' | b' ')
}

impl Rewriter {
    pub fn new() -> Self {
        Self {
            state: State::Data,
            tag: Vec::new(),
            oversized: false,
            name: [0; 16],
            name_len: 0,
            name_long: false,
            attrs: Vec::new(),
            pending: Vec::new(),
            sent: Vec::new(),
            raw_tail: Vec::new(),
            stats: RewriteStats::default(),
        }
    }

    pub fn stats(&self) -> RewriteStats {
        self.stats
    }

    /// Rewrite one chunk; what can be emitted goes to `out` (a start tag or a possible
    /// placeholder prefix at the end of the chunk is held back).
    pub fn feed(&mut self, p: &RewriteParams<'_>, input: &[u8], out: &mut Vec<u8>) {
        let keep = p.placeholder.len().saturating_sub(1);
        self.raw_tail
            .extend_from_slice(&input[input.len().saturating_sub(keep)..]);
        let excess = self.raw_tail.len().saturating_sub(keep);
        self.raw_tail.drain(..excess);
        let from = out.len();
        out.append(&mut self.pending);
        self.tokenize(p, input, out);
        self.scrub(p.placeholder, out, from, false);
    }

    /// The end of the body: everything held back goes out (an unfinished start tag as it was),
    /// except the first part of a placeholder the body was cut in (a `Range` reply, a body
    /// that ends inside a marked tag): that part would hand out most of the secret.
    pub fn finish(&mut self, p: &RewriteParams<'_>, out: &mut Vec<u8>) {
        let from = out.len();
        out.append(&mut self.pending);
        match self.state {
            State::Tag { end: false, .. } if !self.oversized => out.extend_from_slice(&self.tag),
            State::TagOpen => out.push(b'<'),
            _ => {}
        }
        self.tag.clear();
        self.state = State::Data;
        self.scrub(p.placeholder, out, from, true);
        // Decided on the body as it came (not on the output, where removals can join a prefix
        // that an earlier chunk already let out), so chunks never change the result. Those
        // bytes are still here: held back as `pending` or in the unfinished tag.
        let cut = placeholder_prefix_at_end(p.placeholder, &self.raw_tail);
        if cut > 0 && out[from..].ends_with(&p.placeholder[..cut]) {
            out.truncate(out.len() - cut);
            self.stats.scrubbed += 1;
        }
        self.raw_tail.clear();
    }

    /// Rewrite a whole body at once.
    pub fn rewrite_all(p: &RewriteParams<'_>, body: &[u8]) -> (Vec<u8>, RewriteStats) {
        let mut r = Rewriter::new();
        let mut out = Vec::with_capacity(body.len() + 256);
        r.feed(p, body, &mut out);
        r.finish(p, &mut out);
        (out, r.stats)
    }

    // ----------------------------------------------------------------------------- stage 2

    /// Remove every placeholder from `out[from..]`, in place. Removing one can join the bytes
    /// around it into another, so it searches again until none is left — also one that begins
    /// in bytes an earlier chunk let out (then the rest of it is removed). Unless this is the
    /// `last` call, a tail that could begin a placeholder is held back for the next chunk.
    fn scrub(&mut self, placeholder: &[u8], out: &mut Vec<u8>, from: usize, last: bool) {
        let n = placeholder.len();
        if n == 0 {
            return;
        }
        loop {
            let mut again = true;
            while again {
                again = false;
                let (mut read, mut write) = (from, from);
                while let Some(k) = memchr::memmem::find(&out[read..], placeholder) {
                    out.copy_within(read..read + k, write);
                    write += k;
                    read += k + n;
                    self.stats.scrubbed += 1;
                    again = true;
                }
                if again {
                    let len = out.len();
                    out.copy_within(read..len, write);
                    out.truncate(len - (read - write));
                }
            }
            // A removal can also have joined bytes already let out (in an earlier chunk) with
            // what follows into a placeholder. Those bytes are gone: remove the part still here,
            // so the whole placeholder never reaches the client.
            let joined = (1..n).find(|&k| {
                self.sent.ends_with(&placeholder[..k]) && out[from..].starts_with(&placeholder[k..])
            });
            match joined {
                Some(k) => {
                    out.drain(from..from + (n - k));
                    self.stats.scrubbed += 1;
                }
                None => break,
            }
        }
        if !last {
            // A tail that could begin a placeholder is held back for the next chunk.
            let keep = placeholder_prefix_at_end(placeholder, &out[from..]);
            self.pending = out.split_off(out.len() - keep);
        }
        if !last {
            // Only the last n - 1 bytes can begin a placeholder: copy no more than those.
            let fresh = &out[from.max(out.len().saturating_sub(n - 1))..];
            self.sent.extend_from_slice(fresh);
            let excess = self.sent.len().saturating_sub(n - 1);
            self.sent.drain(..excess);
        }
    }

    // ----------------------------------------------------------------------------- stage 1

    fn tokenize(&mut self, p: &RewriteParams<'_>, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        // `input[flushed..i]` passes unchanged and is copied out in one go, when something else
        // must be written or at the end: text and untouched tags are most of a page.
        let mut flushed = 0;
        while i < input.len() {
            if matches!(self.state, State::Data) {
                let Some(k) = memchr::memchr(b'<', &input[i..]) else {
                    i = input.len();
                    break;
                };
                i += k;
                // A whole tag in this chunk: read it in one go.
                if let Some((len, edit)) = self.whole_tag(p, &input[i..]) {
                    if let Some(edit) = edit {
                        out.extend_from_slice(&input[flushed..i]);
                        self.write_tag(p, &input[i..i + len], edit, out);
                        flushed = i + len;
                    }
                    i += len;
                    continue;
                }
            }
            // The tokenizer states write what they consume themselves.
            out.extend_from_slice(&input[flushed..i]);
            if matches!(self.state, State::Plaintext) {
                out.extend_from_slice(&input[i..]);
                return;
            }
            // Most bytes inside a split tag, a script or a style keep the state: move them in
            // one step.
            i += self.run(&input[i..], out);
            if i < input.len() && self.step(p, input[i], out) {
                i += 1;
            }
            flushed = i;
        }
        out.extend_from_slice(&input[flushed..i]);
    }

    /// At a `<` in data: when `input` holds a whole start or end tag (within [`MAX_TAG_BYTES`]),
    /// read it as the byte-by-byte states would (same attributes, same next state) and return its
    /// length and how a start tag is rewritten (`None`: unchanged); otherwise `None`, and the
    /// states take it byte by byte.
    fn whole_tag(
        &mut self,
        p: &RewriteParams<'_>,
        input: &[u8],
    ) -> Option<(usize, Option<TagEdit>)> {
        let (end, from) = match input.get(1)? {
            b'/' => (true, 2),
            _ => (false, 1),
        };
        if !input.get(from)?.is_ascii_alphabetic() {
            return None;
        }
        self.attrs.clear();
        self.name_len = 0;
        self.name_long = false;
        let len = self.scan_tag(&input[..input.len().min(MAX_TAG_BYTES)], from)?;
        if end {
            self.state = State::Data;
            return Some((len, None));
        }
        let edit = self.tag_edit(p, &input[..len]);
        self.enter_content();
        Some((len, edit))
    }

    /// The tag states of [`Self::tag_step`] over a whole tag held in `input` (the name starts at
    /// `from`), with attribute spans as offsets into `input`. Returns the length up to and
    /// including the closing `>`, or `None` when `input` ends first.
    fn scan_tag(&mut self, input: &[u8], from: usize) -> Option<usize> {
        let mut st = TagSt::Name;
        let mut i = from;
        while let Some(&b) = input.get(i) {
            match st {
                TagSt::Name => {
                    if is_ws(b) {
                        st = TagSt::BeforeAttrName;
                    } else if b == b'/' {
                        st = TagSt::SelfClosing;
                    } else if b == b'>' {
                        return Some(i + 1);
                    } else {
                        self.name_push(b);
                    }
                    i += 1;
                }
                TagSt::BeforeAttrName => {
                    if is_ws(b) {
                        i += 1;
                    } else if b == b'/' || b == b'>' {
                        st = TagSt::AfterAttrName;
                    } else {
                        self.attrs.push(Attr {
                            name: (i, i),
                            value: None,
                        });
                        st = TagSt::AttrName;
                        if b == b'=' {
                            i += 1;
                            self.set_name_end(i);
                        }
                    }
                }
                TagSt::AttrName => {
                    let k = until(&input[i..], |c| {
                        is_ws(c) || c == b'/' || c == b'>' || c == b'='
                    });
                    i += k;
                    self.set_name_end(i);
                    match input.get(i) {
                        Some(b'=') => {
                            i += 1;
                            st = TagSt::BeforeAttrValue;
                        }
                        Some(_) => st = TagSt::AfterAttrName,
                        None => return None,
                    }
                }
                TagSt::AfterAttrName => match b {
                    _ if is_ws(b) => i += 1,
                    b'/' => {
                        i += 1;
                        st = TagSt::SelfClosing;
                    }
                    b'=' => {
                        i += 1;
                        st = TagSt::BeforeAttrValue;
                    }
                    b'>' => return Some(i + 1),
                    _ => {
                        self.attrs.push(Attr {
                            name: (i, i),
                            value: None,
                        });
                        st = TagSt::AttrName;
                    }
                },
                TagSt::BeforeAttrValue => match b {
                    _ if is_ws(b) => i += 1,
                    b'"' | b'\'' => {
                        i += 1;
                        let k = until(&input[i..], |c| c == b);
                        self.set_value(i, i + k);
                        i += k + 1;
                        if i > input.len() {
                            return None;
                        }
                        st = TagSt::AfterValueQuoted;
                    }
                    b'>' => return Some(i + 1),
                    _ => {
                        let k = until(&input[i..], |c| is_ws(c) || c == b'>');
                        self.set_value(i, i + k);
                        i += k;
                        st = TagSt::ValueUnq;
                    }
                },
                TagSt::ValueUnq => {
                    // Only a delimiter gets here.
                    if b == b'>' {
                        return Some(i + 1);
                    }
                    i += 1;
                    st = TagSt::BeforeAttrName;
                }
                TagSt::AfterValueQuoted => match b {
                    _ if is_ws(b) => {
                        i += 1;
                        st = TagSt::BeforeAttrName;
                    }
                    b'/' => {
                        i += 1;
                        st = TagSt::SelfClosing;
                    }
                    b'>' => return Some(i + 1),
                    _ => st = TagSt::BeforeAttrName,
                },
                TagSt::SelfClosing => {
                    if b == b'>' {
                        return Some(i + 1);
                    }
                    st = TagSt::BeforeAttrName;
                }
                TagSt::ValueDq | TagSt::ValueSq => return None,
            }
        }
        None
    }

    fn set_name_end(&mut self, at: usize) {
        if let Some(a) = self.attrs.last_mut() {
            a.name.1 = at;
        }
    }

    fn set_value(&mut self, from: usize, to: usize) {
        if let Some(a) = self.attrs.last_mut() {
            a.value = Some((from, to));
        }
    }

    /// Consume the longest prefix of `input` that leaves the state as it is (the bytes a step
    /// would emit one by one, with the same effect), and return its length. The byte after it
    /// goes through [`Self::step`].
    fn run(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        match self.state {
            State::Tag { st, .. } => {
                let k = match st {
                    TagSt::Name => until(input, |c| is_ws(c) || c == b'/' || c == b'>'),
                    TagSt::AttrName => {
                        until(input, |c| is_ws(c) || c == b'/' || c == b'>' || c == b'=')
                    }
                    TagSt::ValueDq => until(input, |c| c == b'"'),
                    TagSt::ValueSq => until(input, |c| c == b'\''),
                    TagSt::ValueUnq => until(input, |c| is_ws(c) || c == b'>'),
                    _ => 0,
                };
                if k == 0 {
                    return 0;
                }
                if st == TagSt::Name {
                    for &c in &input[..k] {
                        self.name_push(c);
                    }
                }
                self.emit_run(&input[..k], out);
                match st {
                    TagSt::AttrName => self.extend_name(),
                    TagSt::ValueDq | TagSt::ValueSq | TagSt::ValueUnq => self.extend_value(),
                    _ => {}
                }
                k
            }
            State::Script {
                st: Script::Normal, ..
            }
            | State::RawText { matched: 0, .. } => {
                let k = until(input, |c| c == b'<');
                out.extend_from_slice(&input[..k]);
                k
            }
            State::BogusComment => {
                let k = until(input, |c| c == b'>');
                out.extend_from_slice(&input[..k]);
                k
            }
            _ => 0,
        }
    }

    /// [`Self::emit`] for a run of bytes.
    fn emit_run(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if matches!(self.state, State::Tag { end: false, .. }) && !self.oversized {
            self.tag.extend_from_slice(bytes);
            if self.tag.len() > MAX_TAG_BYTES {
                out.extend_from_slice(&self.tag);
                self.tag.clear();
                self.oversized = true;
                self.stats.oversized_tags += 1;
            }
        } else {
            out.extend_from_slice(bytes);
        }
    }

    /// Push `b` to where the current token goes: the start-tag buffer, or straight out.
    fn emit(&mut self, b: u8, out: &mut Vec<u8>) {
        if matches!(self.state, State::Tag { end: false, .. }) && !self.oversized {
            self.tag.push(b);
            if self.tag.len() > MAX_TAG_BYTES {
                out.extend_from_slice(&self.tag);
                self.tag.clear();
                self.oversized = true;
                self.stats.oversized_tags += 1;
            }
        } else {
            out.push(b);
        }
    }

    fn name_push(&mut self, b: u8) {
        if self.name_len < self.name.len() {
            self.name[self.name_len] = b.to_ascii_lowercase();
            self.name_len += 1;
        } else {
            self.name_long = true;
        }
    }

    fn tag_name(&self) -> &[u8] {
        if self.name_long {
            b""
        } else {
            &self.name[..self.name_len]
        }
    }

    /// One byte in the current state. Returns false when the byte must be reprocessed in the
    /// new state (nothing was emitted for it).
    fn step(&mut self, p: &RewriteParams<'_>, b: u8, out: &mut Vec<u8>) -> bool {
        match self.state {
            State::Data => {
                // A `<` waits for the next byte: it may open a start tag (held back whole).
                if b == b'<' {
                    self.state = State::TagOpen;
                } else {
                    out.push(b);
                }
            }
            State::Plaintext => out.push(b),
            State::TagOpen => {
                if b.is_ascii_alphabetic() {
                    self.tag.clear();
                    self.tag.push(b'<');
                    self.oversized = false;
                    self.attrs.clear();
                    self.name_len = 0;
                    self.name_long = false;
                    self.state = State::Tag {
                        st: TagSt::Name,
                        end: false,
                    };
                    return false;
                }
                out.push(b'<');
                match b {
                    b'!' => {
                        out.push(b);
                        self.state = State::MarkupDecl(0);
                    }
                    b'/' => {
                        out.push(b);
                        self.state = State::EndTagOpen;
                    }
                    b'?' => {
                        out.push(b);
                        self.state = State::BogusComment;
                    }
                    _ => {
                        self.state = State::Data;
                        return false;
                    }
                }
            }
            State::EndTagOpen => {
                if b.is_ascii_alphabetic() {
                    self.name_len = 0;
                    self.name_long = false;
                    self.state = State::Tag {
                        st: TagSt::Name,
                        end: true,
                    };
                    return false;
                }
                if b == b'>' {
                    out.push(b);
                    self.state = State::Data;
                } else {
                    self.state = State::BogusComment;
                    return false;
                }
            }
            State::MarkupDecl(n) => {
                if b == b'-' {
                    out.push(b);
                    self.state = if n == 0 {
                        State::MarkupDecl(1)
                    } else {
                        State::CommentStart
                    };
                } else {
                    self.state = State::BogusComment;
                    return false;
                }
            }
            State::CommentStart | State::CommentStartDash => {
                out.push(b);
                self.state = match (self.state, b) {
                    (_, b'>') => State::Data,
                    (State::CommentStart, b'-') => State::CommentStartDash,
                    (_, b'-') => State::Comment {
                        dashes: 2,
                        bang: false,
                    },
                    _ => State::Comment {
                        dashes: 0,
                        bang: false,
                    },
                };
            }
            State::Comment { dashes, bang } => {
                out.push(b);
                self.state = match b {
                    b'-' if bang => State::Comment {
                        dashes: 1,
                        bang: false,
                    },
                    b'-' => State::Comment {
                        dashes: (dashes + 1).min(2),
                        bang: false,
                    },
                    b'>' if dashes >= 2 || bang => State::Data,
                    b'!' if dashes >= 2 && !bang => State::Comment { dashes, bang: true },
                    _ => State::Comment {
                        dashes: 0,
                        bang: false,
                    },
                };
            }
            State::BogusComment => {
                out.push(b);
                if b == b'>' {
                    self.state = State::Data;
                }
            }
            State::Tag { st, end } => return self.tag_step(p, st, end, b, out),
            State::RawText { name, matched } => {
                out.push(b);
                self.state =
                    raw_end_step(name, matched, b, |m| State::RawText { name, matched: m })
                        .unwrap_or_else(|| self.end_tag_after_name(b));
            }
            State::Script { st, k, ok } => return self.script_step(st, k, ok, b, out),
        }
        true
    }

    /// The state after `</name` plus the delimiter `b` (whitespace, `/` or `>`).
    fn end_tag_after_name(&mut self, b: u8) -> State {
        match b {
            b'>' => State::Data,
            b'/' => State::Tag {
                st: TagSt::SelfClosing,
                end: true,
            },
            _ => State::Tag {
                st: TagSt::BeforeAttrName,
                end: true,
            },
        }
    }

    fn tag_step(
        &mut self,
        p: &RewriteParams<'_>,
        st: TagSt,
        end: bool,
        b: u8,
        out: &mut Vec<u8>,
    ) -> bool {
        let set = |s: &mut Self, st: TagSt| s.state = State::Tag { st, end };
        match st {
            TagSt::Name => {
                if is_ws(b) {
                    set(self, TagSt::BeforeAttrName);
                } else if b == b'/' {
                    set(self, TagSt::SelfClosing);
                } else if b == b'>' {
                    self.emit(b, out);
                    self.close_tag(p, end, out);
                    return true;
                } else {
                    self.name_push(b);
                }
                self.emit(b, out);
            }
            TagSt::BeforeAttrName => {
                if is_ws(b) {
                    self.emit(b, out);
                } else if b == b'/' || b == b'>' {
                    set(self, TagSt::AfterAttrName);
                    return false;
                } else {
                    self.start_attr();
                    set(self, TagSt::AttrName);
                    if b == b'=' {
                        // `=` as the first character of a name is part of the name.
                        self.emit(b, out);
                        self.extend_name();
                    } else {
                        return false;
                    }
                }
            }
            TagSt::AttrName => {
                if is_ws(b) || b == b'/' || b == b'>' {
                    set(self, TagSt::AfterAttrName);
                    return false;
                }
                self.emit(b, out);
                if b == b'=' {
                    set(self, TagSt::BeforeAttrValue);
                } else {
                    self.extend_name();
                }
            }
            TagSt::AfterAttrName => match b {
                _ if is_ws(b) => self.emit(b, out),
                b'/' => {
                    self.emit(b, out);
                    set(self, TagSt::SelfClosing);
                }
                b'=' => {
                    self.emit(b, out);
                    set(self, TagSt::BeforeAttrValue);
                }
                b'>' => {
                    self.emit(b, out);
                    self.close_tag(p, end, out);
                }
                _ => {
                    self.start_attr();
                    set(self, TagSt::AttrName);
                    return false;
                }
            },
            TagSt::BeforeAttrValue => match b {
                _ if is_ws(b) => self.emit(b, out),
                b'"' | b'\'' => {
                    self.emit(b, out);
                    self.start_value();
                    set(
                        self,
                        if b == b'"' {
                            TagSt::ValueDq
                        } else {
                            TagSt::ValueSq
                        },
                    );
                }
                b'>' => {
                    self.emit(b, out);
                    self.close_tag(p, end, out);
                }
                _ => {
                    self.start_value();
                    set(self, TagSt::ValueUnq);
                    return false;
                }
            },
            TagSt::ValueDq | TagSt::ValueSq => {
                let quote = if st == TagSt::ValueDq { b'"' } else { b'\'' };
                if b == quote {
                    set(self, TagSt::AfterValueQuoted);
                }
                self.emit(b, out);
                if b != quote {
                    self.extend_value();
                }
            }
            TagSt::ValueUnq => {
                if is_ws(b) {
                    self.emit(b, out);
                    set(self, TagSt::BeforeAttrName);
                } else if b == b'>' {
                    self.emit(b, out);
                    self.close_tag(p, end, out);
                } else {
                    self.emit(b, out);
                    self.extend_value();
                }
            }
            TagSt::AfterValueQuoted => match b {
                _ if is_ws(b) => {
                    self.emit(b, out);
                    set(self, TagSt::BeforeAttrName);
                }
                b'/' => {
                    self.emit(b, out);
                    set(self, TagSt::SelfClosing);
                }
                b'>' => {
                    self.emit(b, out);
                    self.close_tag(p, end, out);
                }
                _ => {
                    set(self, TagSt::BeforeAttrName);
                    return false;
                }
            },
            TagSt::SelfClosing => {
                if b == b'>' {
                    self.emit(b, out);
                    self.close_tag(p, end, out);
                } else {
                    set(self, TagSt::BeforeAttrName);
                    return false;
                }
            }
        }
        true
    }

    // Attribute spans are offsets into `self.tag`; they are only kept while the tag is not
    // oversized (an oversized tag is never rewritten).

    fn pos(&self) -> usize {
        self.tag.len()
    }

    fn start_attr(&mut self) {
        if !self.oversized {
            let at = self.pos();
            self.attrs.push(Attr {
                name: (at, at),
                value: None,
            });
        }
    }

    fn extend_name(&mut self) {
        if !self.oversized {
            let at = self.pos();
            if let Some(a) = self.attrs.last_mut() {
                a.name.1 = at;
            }
        }
    }

    fn start_value(&mut self) {
        if !self.oversized {
            let at = self.pos();
            if let Some(a) = self.attrs.last_mut() {
                a.value = Some((at, at));
            }
        }
    }

    fn extend_value(&mut self) {
        if !self.oversized {
            let at = self.pos();
            if let Some(Attr { value: Some(v), .. }) = self.attrs.last_mut() {
                v.1 = at;
            }
        }
    }

    /// The tag's `>` was read: rewrite and emit a start tag, then enter the content state its
    /// name calls for.
    fn close_tag(&mut self, p: &RewriteParams<'_>, end: bool, out: &mut Vec<u8>) {
        if end {
            self.state = State::Data;
            return;
        }
        if self.oversized {
            self.oversized = false;
        } else {
            let tag = std::mem::take(&mut self.tag);
            match self.tag_edit(p, &tag) {
                Some(edit) => self.write_tag(p, &tag, edit, out),
                None => out.extend_from_slice(&tag),
            }
            self.tag = tag;
            self.tag.clear();
        }
        self.enter_content();
    }

    /// After a start tag: the content state its name calls for.
    fn enter_content(&mut self) {
        let name: &[u8] = self.tag_name();
        self.state = match content_of(name) {
            Some(Raw::Script) => State::Script {
                st: Script::Normal,
                k: 0,
                ok: false,
            },
            Some(Raw::Text(name)) => State::RawText { name, matched: 0 },
            Some(Raw::Plain) => State::Plaintext,
            None => State::Data,
        };
    }

    /// Which nonce the current tag (its attributes in `self.attrs`) would get: `script` and
    /// script preloads the script nonce, `style` and other `link`s the style nonce, any other
    /// element none (a nonce means nothing there; its placeholder is removed).
    fn nonce_kind(&self, tag: &[u8]) -> Option<NonceKind> {
        match self.tag_name() {
            b"script" => Some(NonceKind::Script),
            b"style" => Some(NonceKind::Style),
            b"link" => {
                let value = |name: &[u8]| {
                    self.attrs
                        .iter()
                        .find(|a| tag[a.name.0..a.name.1].eq_ignore_ascii_case(name))
                        .and_then(|a| a.value.map(|(s, e)| &tag[s..e]))
                        .unwrap_or_default()
                };
                let rel_has = |t: &[u8]| {
                    value(b"rel")
                        .split(|&c| is_ws(c))
                        .any(|r| r.eq_ignore_ascii_case(t))
                };
                let script_preload = rel_has(b"modulepreload")
                    || rel_has(b"preload") && value(b"as").eq_ignore_ascii_case(b"script");
                Some(if script_preload {
                    NonceKind::Script
                } else {
                    NonceKind::Style
                })
            }
            _ => None,
        }
    }

    /// How a start tag is rewritten (its attributes are in `self.attrs`), or `None`.
    fn tag_edit(&mut self, p: &RewriteParams<'_>, tag: &[u8]) -> Option<TagEdit> {
        let attr_name = |a: &Attr| &tag[a.name.0..a.name.1];
        let attr_value = |a: &Attr| a.value.map(|(s, e)| &tag[s..e]);
        let find = |name: &[u8]| {
            self.attrs
                .iter()
                .find(|a| attr_name(a).eq_ignore_ascii_case(name))
        };
        // The nonce: the first `nonce` attribute, when it is exactly the placeholder, the tag
        // is one a nonce applies to (its name picks which nonce) and it is nonceable (CSP3 "is
        // element nonceable", tightened: no `<` anywhere in the tag, no duplicate attributes,
        // which is how injected markup steals a following tag's nonce).
        let mut replace: Option<(usize, usize, NonceKind)> = None;
        let mut refused = false;
        if !p.placeholder.is_empty() {
            if let Some(a) = find(b"nonce") {
                if attr_value(a) == Some(p.placeholder) {
                    if let Some(kind) = self.nonce_kind(tag) {
                        match a.value {
                            Some((s, e)) if nonceable(tag, &self.attrs) => {
                                replace = Some((s, e, kind))
                            }
                            _ => refused = true,
                        }
                    }
                }
            }
        }
        // SRI.
        let mut insert: Option<String> = None;
        if let Some(sri) = p.sri {
            let name = self.tag_name();
            let url_attr: Option<&[u8]> = if name == b"script" {
                Some(b"src")
            } else if name == b"link"
                && find(b"rel").and_then(attr_value).is_some_and(|rel| {
                    rel.split(|&c| is_ws(c))
                        .any(|t| t.eq_ignore_ascii_case(b"stylesheet"))
                })
            {
                Some(b"href")
            } else {
                None
            };
            if let Some(url) = url_attr.and_then(find).and_then(attr_value) {
                if find(b"integrity").is_none() {
                    let url = String::from_utf8_lossy(url);
                    if let Some(hash) = sri.lookup(&url, p.page_path) {
                        let mut s = format!(" integrity=\"{hash}\"");
                        if find(b"crossorigin").is_none() {
                            s.push_str(" crossorigin=\"anonymous\"");
                        }
                        insert = Some(s);
                    }
                }
            }
        }
        if refused {
            self.stats.nonce_refused += 1;
        }
        if replace.is_none() && insert.is_none() {
            return None;
        }
        Some(TagEdit { insert, replace })
    }

    /// Write `tag` with `edit` applied.
    fn write_tag(&mut self, p: &RewriteParams<'_>, tag: &[u8], edit: TagEdit, out: &mut Vec<u8>) {
        let name_end = 1 + tag[1..]
            .iter()
            .position(|&c| is_ws(c) || c == b'/' || c == b'>')
            .unwrap_or(tag.len() - 1);
        let mut last = 0;
        if let Some(s) = &edit.insert {
            out.extend_from_slice(&tag[..name_end]);
            out.extend_from_slice(s.as_bytes());
            last = name_end;
            self.stats.integrity += 1;
        }
        if let Some((s, e, kind)) = edit.replace {
            out.extend_from_slice(&tag[last..s]);
            if let Some(nonces) = p.nonce {
                let nonce = match kind {
                    NonceKind::Script => nonces.script,
                    NonceKind::Style => nonces.style,
                };
                out.extend_from_slice(nonce.as_bytes());
                self.stats.nonces += 1;
            }
            last = e;
        }
        out.extend_from_slice(&tag[last..]);
    }

    fn script_step(&mut self, st: Script, k: usize, ok: bool, b: u8, out: &mut Vec<u8>) -> bool {
        use Script::*;
        const NAME: &[u8] = b"script";
        let delim = is_ws(b) || b == b'/' || b == b'>';
        let go =
            |s: &mut Self, st: Script, k: usize, ok: bool| s.state = State::Script { st, k, ok };
        match st {
            Normal => {
                out.push(b);
                if b == b'<' {
                    go(self, LessThan, 0, false);
                }
            }
            LessThan => match b {
                b'/' => {
                    out.push(b);
                    go(self, EndTag, 0, false);
                }
                b'!' => {
                    out.push(b);
                    go(self, EscapeStart, 0, false);
                }
                _ => {
                    go(self, Normal, 0, false);
                    return false;
                }
            },
            EndTag | EscapedEndTag => {
                let back = if st == EndTag { Normal } else { Escaped };
                if k < NAME.len() && b.to_ascii_lowercase() == NAME[k] {
                    out.push(b);
                    go(self, st, k + 1, false);
                } else if k == NAME.len() && delim {
                    out.push(b);
                    self.state = self.end_tag_after_name(b);
                } else {
                    go(self, back, 0, false);
                    return false;
                }
            }
            EscapeStart | EscapeStartDash => {
                if b == b'-' {
                    out.push(b);
                    let next = if st == EscapeStart {
                        EscapeStartDash
                    } else {
                        EscapedDashDash
                    };
                    go(self, next, 0, false);
                } else {
                    go(self, Normal, 0, false);
                    return false;
                }
            }
            Escaped | EscapedDash | EscapedDashDash => {
                out.push(b);
                let next = match b {
                    b'-' if st == Escaped => EscapedDash,
                    b'-' => EscapedDashDash,
                    b'<' => EscapedLessThan,
                    b'>' if st == EscapedDashDash => Normal,
                    _ => Escaped,
                };
                go(self, next, 0, false);
            }
            EscapedLessThan => {
                if b == b'/' {
                    out.push(b);
                    go(self, EscapedEndTag, 0, false);
                } else if b.is_ascii_alphabetic() {
                    go(self, DoubleEscapeStart, 0, true);
                    return false;
                } else {
                    go(self, Escaped, 0, false);
                    return false;
                }
            }
            DoubleEscapeStart | DoubleEscapeEnd => {
                // Letters after `<` (start) or `</` (end) compared with "script"; a delimiter
                // after exactly "script" switches between escaped and double-escaped.
                let (hit, miss) = if st == DoubleEscapeStart {
                    (DoubleEscaped, Escaped)
                } else {
                    (Escaped, DoubleEscaped)
                };
                if b.is_ascii_alphabetic() {
                    out.push(b);
                    let good = ok && k < NAME.len() && NAME[k] == b.to_ascii_lowercase();
                    go(self, st, (k + 1).min(NAME.len() + 1), good);
                } else if delim {
                    out.push(b);
                    let next = if ok && k == NAME.len() { hit } else { miss };
                    go(self, next, 0, false);
                } else {
                    go(self, miss, 0, false);
                    return false;
                }
            }
            DoubleEscaped | DoubleEscapedDash | DoubleEscapedDashDash => {
                out.push(b);
                let next = match b {
                    b'-' if st == DoubleEscaped => DoubleEscapedDash,
                    b'-' => DoubleEscapedDashDash,
                    b'<' => DoubleEscapedLessThan,
                    b'>' if st == DoubleEscapedDashDash => Normal,
                    _ => DoubleEscaped,
                };
                go(self, next, 0, false);
            }
            DoubleEscapedLessThan => {
                if b == b'/' {
                    out.push(b);
                    go(self, DoubleEscapeEnd, 0, true);
                } else {
                    go(self, DoubleEscaped, 0, false);
                    return false;
                }
            }
        }
        true
    }
}

/// The length of the longest tail of `bytes` that is a proper prefix of `placeholder` (at most
/// one byte shorter than it), 0 when none.
fn placeholder_prefix_at_end(placeholder: &[u8], bytes: &[u8]) -> usize {
    let n = placeholder.len();
    let tail = &bytes[bytes.len().saturating_sub(n.saturating_sub(1))..];
    (1..=tail.len())
        .rev()
        .find(|&k| tail[tail.len() - k..] == placeholder[..k])
        .unwrap_or(0)
}

/// What a body that is not HTML gets on a guarded route: every placeholder in it replaced by as
/// many spaces, so its length, and its `Content-Length`, stay as they were and it can stream
/// (a space is outside the placeholder's alphabet, so no blanking can make a new one). A tail
/// that could begin a placeholder is held back for the next chunk (never more than the
/// placeholder's length) and blanked at the end of the body. The upstream may serve a template
/// as `text/plain`, JSON, a script, …: the placeholder never leaves in any of them.
#[derive(Debug, Default)]
pub struct Blanker {
    pending: Vec<u8>,
    blanked: u32,
}

/// What a [`Blanker`] writes over a placeholder.
pub const BLANK: u8 = b' ';

impl Blanker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Placeholders (whole or cut at the end) blanked so far.
    pub fn blanked(&self) -> u32 {
        self.blanked
    }

    /// Blank one chunk into `out`. Returns whether `out` differs from `input` (something was
    /// blanked, held back, or let out from the previous chunk): if not, the chunk can pass as
    /// it is.
    pub fn feed(&mut self, placeholder: &[u8], input: &[u8], out: &mut Vec<u8>) -> bool {
        let from = out.len();
        let held = self.pending.len();
        out.append(&mut self.pending);
        out.extend_from_slice(input);
        let before = self.blanked;
        self.blank(placeholder, out, from, false);
        held > 0 || !self.pending.is_empty() || self.blanked != before
    }

    /// The end of the body: what was held back goes out, a cut placeholder blanked.
    pub fn finish(&mut self, placeholder: &[u8], out: &mut Vec<u8>) {
        let from = out.len();
        out.append(&mut self.pending);
        self.blank(placeholder, out, from, true);
    }

    fn blank(&mut self, placeholder: &[u8], out: &mut Vec<u8>, from: usize, last: bool) {
        let n = placeholder.len();
        if n == 0 {
            return;
        }
        let mut at = from;
        while let Some(k) = memchr::memmem::find(&out[at..], placeholder) {
            out[at + k..at + k + n].fill(BLANK);
            at += k + n;
            self.blanked += 1;
        }
        let keep = placeholder_prefix_at_end(placeholder, &out[at..]);
        let len = out.len();
        if !last {
            self.pending = out.split_off(len - keep);
        } else if keep > 0 {
            out[len - keep..].fill(BLANK);
            self.blanked += 1;
        }
    }
}

/// One byte of raw text looking for `</name` + delimiter: `Some(next)` to stay in raw text,
/// `None` when the end tag's name is complete and `b` is its delimiter.
fn raw_end_step(
    name: &'static [u8],
    matched: usize,
    b: u8,
    stay: impl Fn(usize) -> State,
) -> Option<State> {
    // matched: 0 nothing, 1 `<`, 2 `</`, 2+k: `</` + k letters.
    let next = match matched {
        0 => usize::from(b == b'<'),
        1 if b == b'/' => 2,
        m if m >= 2 && m - 2 < name.len() && b.to_ascii_lowercase() == name[m - 2] => m + 1,
        m if m >= 2 && m - 2 == name.len() && (is_ws(b) || b == b'/' || b == b'>') => return None,
        _ => usize::from(b == b'<'),
    };
    Some(stay(next))
}

/// The length of the prefix of `input` without a byte that `stop`s it.
#[inline(always)]
fn until(input: &[u8], stop: impl Fn(u8) -> bool) -> usize {
    input.iter().position(|&c| stop(c)).unwrap_or(input.len())
}

fn content_of(name: &[u8]) -> Option<Raw> {
    Some(match name {
        b"script" => Raw::Script,
        b"style" => Raw::Text(b"style"),
        b"xmp" => Raw::Text(b"xmp"),
        b"iframe" => Raw::Text(b"iframe"),
        b"noembed" => Raw::Text(b"noembed"),
        b"noframes" => Raw::Text(b"noframes"),
        b"noscript" => Raw::Text(b"noscript"),
        b"textarea" => Raw::Text(b"textarea"),
        b"title" => Raw::Text(b"title"),
        b"plaintext" => Raw::Plain,
        _ => return None,
    })
}

/// CSP3 "is element nonceable?", on the tag as written, tightened: CSP3 refuses an attribute
/// name or value containing `<script` or `<style`; any `<` in the tag (its name, an attribute
/// name or value) is refused here, since a `<` inside a start tag is what dangling markup
/// injected before a marked tag looks like (`<img src='//evil?` swallowing the tag, `<a x=<p`).
/// Duplicate attributes are refused too.
fn nonceable(tag: &[u8], attrs: &[Attr]) -> bool {
    if tag.get(1..).is_some_and(|rest| rest.contains(&b'<')) {
        return false;
    }
    for (i, a) in attrs.iter().enumerate() {
        let name = &tag[a.name.0..a.name.1];
        if attrs[..i]
            .iter()
            .any(|o| tag[o.name.0..o.name.1].eq_ignore_ascii_case(name))
        {
            return false;
        }
    }
    true
}
