//! Continuous batching, as pure bookkeeping: which requests run, which
//! tokens each feeds into the next step, and which KV pages each holds.
//! No model and no I/O here; the runner executes the plans.
//!
//! Policy, per step:
//! 1. every running sequence that is decoding feeds its one new token
//!    (decodes go first: they are what keeps streams flowing);
//! 2. running sequences still prefilling get chunks of their prompts, in
//!    admission order, within what is left of `max_batch_tokens`;
//! 3. waiting requests are admitted strictly first-in first-out while a
//!    running slot, the token budget and KV pages allow; the head of the
//!    queue is never overtaken, so a long prompt cannot starve.
//!
//! A request is admitted only with pages for its whole length (prompt plus
//! the most tokens it may generate), so a running sequence never runs out
//! of cache mid-flight and nothing has to be preempted. Pages return to the
//! pool when the request finishes or is cancelled.
//!
//! Prefix caching ([`PagePool`]): every page a sequence fills is published
//! once its positions are computed, prompt and generated tokens alike, and
//! an admitted prompt takes the pages of its longest published prefix: its
//! first chunk starts after them ([`Work::start`]).

use std::collections::VecDeque;

use crate::serve::kv_cache::{PageId, pages_for};
use crate::serve::prefix_cache::{BlockId, NotAllocated, PagePool, root};

/// Most rows of scored prompts ([`Scheduler::enqueue_whole`]) one step
/// feeds: each returns a row of logits (`vocab` floats: 128 MiB at this
/// bound for a vocabulary of 128k), where a generating prompt returns one.
pub const MAX_SCORED_ROWS: usize = 256;

/// Identifies a request for its whole life.
pub type RequestId = u64;

/// The scheduler's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Tokens fed into one step, over all sequences (≥ `max_running`, so
    /// every decoding sequence fits in every step).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests waiting for admission; more are refused.
    pub max_waiting: usize,
    pub page_size: usize,
    /// Whether prompts reuse the cached pages of a prefix they share.
    pub prefix_caching: bool,
}

/// Why a request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The waiting queue is full: try again later.
    QueueFull,
    /// It needs more KV pages than the whole cache has.
    TooLarge { pages: usize, total: usize },
}

#[derive(Clone, Debug)]
struct Waiting {
    id: RequestId,
    prompt: Vec<u32>,
    /// Prompt plus the most tokens it may generate.
    max_len: usize,
    /// Whether its prompt may start from cached pages (not when every
    /// prompt row's logits are wanted: a cached row computes none).
    reuse: bool,
    adapter: Option<usize>,
}

#[derive(Clone, Debug)]
struct Running {
    id: RequestId,
    pages: Vec<PageId>,
    /// Tokens known: the prompt and every sampled token.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    cached: usize,
    prompt_len: usize,
    /// Pages published (or found published), from the first.
    published: usize,
    /// The block of the last of them.
    parent: BlockId,
    /// Every prompt row's logits are wanted (prompt log-probabilities).
    scored: bool,
    /// The adapter it runs with (`None`: the base model).
    adapter: Option<usize>,
}

impl Running {
    fn known(&self) -> usize {
        self.tokens.len()
    }

    /// Whether its next chunk is part of a scored prompt.
    fn scoring(&self) -> bool {
        self.scored && self.cached < self.prompt_len
    }
}

/// One sequence's work in a planned step: feed tokens `start..start + len`
/// of it; sample the next token after them when `sample`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    pub id: RequestId,
    pub start: usize,
    pub len: usize,
    pub sample: bool,
    /// Every row's logits are wanted (a chunk of a scored prompt).
    pub score: bool,
    pub pages: Vec<PageId>,
    /// The adapter the sequence runs with (`None`: the base model).
    pub adapter: Option<usize>,
}

/// The requests and the page pool.
#[derive(Clone, Debug)]
pub struct Scheduler {
    limits: Limits,
    pages: PagePool,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
}

impl Scheduler {
    pub fn new(limits: Limits, total_pages: usize) -> Self {
        Self {
            limits,
            pages: PagePool::new(total_pages, limits.page_size, limits.prefix_caching),
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn pages_used(&self) -> usize {
        self.pages.used()
    }

    pub fn pages_total(&self) -> usize {
        self.pages.total()
    }

    /// Pages no sequence holds that keep a published prefix.
    pub fn pages_cached(&self) -> usize {
        self.pages.cached()
    }

    /// Queues a request with `prompt` that may grow to `max_len` tokens,
    /// run with `adapter` (`None`: the base model); its prompt reuses only
    /// prefixes the same model computed.
    pub fn enqueue(
        &mut self,
        id: RequestId,
        prompt: &[u32],
        max_len: usize,
        adapter: Option<usize>,
    ) -> Result<(), Rejected> {
        self.queue(id, prompt, max_len, true, adapter)
    }

    /// [`Self::enqueue`] for a prompt that is computed whole, reusing no
    /// cached prefix (its every row's logits are wanted: prompt
    /// log-probabilities). Its pages are published as any prompt's.
    pub fn enqueue_whole(
        &mut self,
        id: RequestId,
        prompt: &[u32],
        max_len: usize,
        adapter: Option<usize>,
    ) -> Result<(), Rejected> {
        self.queue(id, prompt, max_len, false, adapter)
    }

    fn queue(
        &mut self,
        id: RequestId,
        prompt: &[u32],
        max_len: usize,
        reuse: bool,
        adapter: Option<usize>,
    ) -> Result<(), Rejected> {
        let pages = pages_for(max_len, self.limits.page_size);
        if pages > self.pages.total() {
            return Err(Rejected::TooLarge {
                pages,
                total: self.pages.total(),
            });
        }
        if self.waiting.len() >= self.limits.max_waiting {
            return Err(Rejected::QueueFull);
        }
        self.waiting.push_back(Waiting {
            id,
            prompt: prompt.to_vec(),
            max_len,
            reuse,
            adapter,
        });
        Ok(())
    }

    /// Plans the next step (admitting what fits). Empty when idle.
    pub fn plan(&mut self) -> Vec<Work> {
        let mut budget = self.limits.max_batch_tokens;
        // Rows of scored prompts: each returns a row of logits.
        let mut scored = MAX_SCORED_ROWS;
        let mut work = Vec::new();
        // 1. Decodes.
        for seq in &self.running {
            if seq.cached >= seq.prompt_len && seq.known() - seq.cached == 1 && budget > 0 {
                budget -= 1;
                work.push(feed(seq, 1));
            }
        }
        // 2. Prefills already under way, in admission order.
        for seq in &self.running {
            if seq.cached < seq.prompt_len && budget > 0 {
                let mut len = budget.min(seq.known() - seq.cached);
                if seq.scored {
                    len = len.min(scored);
                    scored -= len;
                }
                if len > 0 {
                    budget -= len;
                    work.push(feed(seq, len));
                }
            }
        }
        // 3. Admissions, first in first out.
        while budget > 0 && self.running.len() < self.limits.max_running {
            let Some(head) = self.waiting.front() else {
                break;
            };
            if !head.reuse && scored == 0 {
                break;
            }
            // The prompt's last token is always fed: its logits start the
            // completion (and a shared page is never written).
            let reusable = if head.reuse {
                head.prompt.len().saturating_sub(1)
            } else {
                0
            };
            let prefix = self
                .pages
                .lookup_from(root(head.adapter), &head.prompt[..reusable]);
            let needed = pages_for(head.max_len, self.limits.page_size);
            let Some(pages) = self
                .pages
                .allocate_after(&prefix.pages, needed.saturating_sub(prefix.pages.len()))
            else {
                break;
            };
            let head = self.waiting.pop_front().expect("the head was just seen");
            let seq = Running {
                id: head.id,
                pages,
                prompt_len: head.prompt.len(),
                tokens: head.prompt,
                cached: prefix.pages.len() * self.limits.page_size,
                published: prefix.pages.len(),
                parent: prefix.last,
                scored: !head.reuse,
                adapter: head.adapter,
            };
            let mut len = budget.min(seq.known() - seq.cached);
            if seq.scored {
                len = len.min(scored);
                scored -= len;
            }
            budget -= len;
            work.push(feed(&seq, len));
            self.running.push(seq);
        }
        work
    }

    /// Records that a planned step ran: `work`'s tokens are cached, and
    /// each page they completed is published. The tokens sampled after it
    /// come with [`Self::append`].
    pub fn complete(&mut self, work: &[Work]) {
        let page_size = self.limits.page_size;
        for w in work {
            if let Some(seq) = self.running.iter_mut().find(|s| s.id == w.id) {
                seq.cached = w.start + w.len;
                while (seq.published + 1) * page_size <= seq.cached {
                    let at = seq.published;
                    let tokens = &seq.tokens[at * page_size..(at + 1) * page_size];
                    seq.parent = self.pages.publish(seq.pages[at], seq.parent, tokens);
                    seq.published += 1;
                }
            }
        }
    }

    /// Records the token sampled for request `id` (the next to feed).
    pub fn append(&mut self, id: RequestId, token: u32) {
        if let Some(seq) = self.running.iter_mut().find(|s| s.id == id) {
            seq.tokens.push(token);
        }
    }

    /// Removes a request, waiting or running, returning its pages. Unknown
    /// ids are fine (a request can finish and be cancelled in the same step).
    pub fn remove(&mut self, id: RequestId) -> Result<(), NotAllocated> {
        self.waiting.retain(|w| w.id != id);
        if let Some(at) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(at);
            self.pages.release(&seq.pages)?;
        }
        Ok(())
    }
}

fn feed(seq: &Running, len: usize) -> Work {
    Work {
        id: seq.id,
        start: seq.cached,
        len,
        sample: seq.cached + len == seq.known(),
        score: seq.scoring(),
        pages: seq.pages.clone(),
        adapter: seq.adapter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_batch_tokens: usize, max_running: usize, max_waiting: usize) -> Limits {
        Limits {
            max_batch_tokens,
            max_running,
            max_waiting,
            page_size: 4,
            prefix_caching: true,
        }
    }

    /// A prompt of `len` tokens no other request's shares.
    fn prompt(id: RequestId, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| id as u32 * 1000 + i).collect()
    }

    /// Plans and completes one step, sampling token 7 for each sequence
    /// that samples; returns `(id, len, sample)` per work item.
    fn step(s: &mut Scheduler) -> Vec<(RequestId, usize, bool)> {
        step_with_start(s)
            .into_iter()
            .map(|(id, _, len, sample)| (id, len, sample))
            .collect()
    }

    /// As [`step`], with each work item's start: `(id, start, len, sample)`.
    fn step_with_start(s: &mut Scheduler) -> Vec<(RequestId, usize, usize, bool)> {
        let work = s.plan();
        s.complete(&work);
        for w in work.iter().filter(|w| w.sample) {
            s.append(w.id, 7);
        }
        work.iter()
            .map(|w| (w.id, w.start, w.len, w.sample))
            .collect()
    }

    #[test]
    fn prompts_are_chunked_within_the_token_budget() {
        let mut s = Scheduler::new(limits(8, 4, 8), 100);
        s.enqueue(1, &prompt(1, 10), 12, None).unwrap();
        s.enqueue(2, &prompt(2, 3), 5, None).unwrap();
        assert_eq!(step(&mut s), [(1, 8, false)]);
        // Request 1 finishes its prompt; 2 is admitted with what is left.
        assert_eq!(step(&mut s), [(1, 2, true), (2, 3, true)]);
        // Both decode.
        assert_eq!(step(&mut s), [(1, 1, true), (2, 1, true)]);
    }

    #[test]
    fn decodes_go_before_prefills() {
        let mut s = Scheduler::new(limits(4, 4, 8), 100);
        s.enqueue(1, &prompt(1, 2), 6, None).unwrap();
        assert_eq!(step(&mut s), [(1, 2, true)]);
        s.enqueue(2, &prompt(2, 9), 12, None).unwrap();
        assert_eq!(step(&mut s), [(1, 1, true), (2, 3, false)]);
        assert_eq!(step(&mut s), [(1, 1, true), (2, 3, false)]);
    }

    #[test]
    fn admission_is_first_in_first_out_and_waits_for_pages() {
        // 4 pages of 4 tokens: request 1 takes 3, request 2 needs 2.
        let mut s = Scheduler::new(limits(64, 8, 8), 4);
        s.enqueue(1, &prompt(1, 4), 12, None).unwrap();
        s.enqueue(2, &prompt(2, 4), 8, None).unwrap();
        s.enqueue(3, &prompt(3, 1), 4, None).unwrap();
        assert_eq!(step(&mut s), [(1, 4, true)]);
        // Request 3 would fit, but 2 is first in line.
        assert_eq!(step(&mut s), [(1, 1, true)]);
        assert_eq!(s.pages_used(), 3);
        s.remove(1).unwrap();
        assert_eq!(s.pages_used(), 0);
        // Its first page is cached (a whole computed page), and is handed
        // out again when nothing else is left.
        assert_eq!(s.pages_cached(), 1);
        assert_eq!(step(&mut s), [(2, 4, true), (3, 1, true)]);
        s.remove(2).unwrap();
        s.remove(3).unwrap();
        assert!(s.is_idle());
        assert_eq!(s.pages_used(), 0);
    }

    #[test]
    fn running_slots_bound_the_batch() {
        let mut s = Scheduler::new(limits(64, 2, 8), 100);
        for id in 1..=3 {
            s.enqueue(id, &prompt(id, 1), 4, None).unwrap();
        }
        assert_eq!(step(&mut s), [(1, 1, true), (2, 1, true)]);
        assert_eq!((s.running(), s.waiting()), (2, 1));
        s.remove(1).unwrap();
        assert_eq!(step(&mut s), [(2, 1, true), (3, 1, true)]);
    }

    #[test]
    fn a_full_queue_and_an_oversized_request_are_refused() {
        let mut s = Scheduler::new(limits(8, 1, 2), 3);
        assert_eq!(
            s.enqueue(9, &prompt(9, 4), 13, None),
            Err(Rejected::TooLarge { pages: 4, total: 3 })
        );
        s.enqueue(1, &prompt(1, 1), 4, None).unwrap();
        s.enqueue(2, &prompt(2, 1), 4, None).unwrap();
        assert_eq!(
            s.enqueue(3, &prompt(3, 1), 4, None),
            Err(Rejected::QueueFull)
        );
        // Cancelling a waiting request frees its place in the queue.
        s.remove(2).unwrap();
        s.enqueue(3, &prompt(3, 1), 4, None).unwrap();
    }

    #[test]
    fn a_prompt_starts_after_its_longest_cached_prefix() {
        let mut s = Scheduler::new(limits(64, 4, 8), 100);
        let system = prompt(1, 10);
        s.enqueue(1, &system, 12, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(1, 0, 10, true)]);
        s.remove(1).unwrap();
        // Pages 0 and 1 (tokens 0–7) were completed; the third was not.
        assert_eq!(s.pages_cached(), 2);
        let mut question = system[..9].to_vec();
        question.extend([5, 6, 7]);
        s.enqueue(2, &question, 16, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(2, 8, 4, true)]);
        // A different first page shares nothing.
        let mut other = question.clone();
        other[0] += 1;
        s.enqueue(3, &other, 16, None).unwrap();
        assert_eq!(
            step_with_start(&mut s),
            [(2, 12, 1, true), (3, 0, 12, true)]
        );
    }

    #[test]
    fn a_prompt_reuses_only_the_pages_its_own_model_computed() {
        let mut s = Scheduler::new(limits(64, 4, 8), 100);
        let system = prompt(1, 10);
        s.enqueue(1, &system, 12, None).unwrap();
        step(&mut s);
        s.remove(1).unwrap();
        // The same tokens under an adapter have other keys and values:
        // nothing of the base model's is reused, and the work says which
        // adapter runs.
        s.enqueue(2, &system, 12, Some(0)).unwrap();
        let work = s.plan();
        assert_eq!(
            work.iter()
                .map(|w| (w.id, w.start, w.adapter))
                .collect::<Vec<_>>(),
            [(2, 0, Some(0))]
        );
        s.complete(&work);
        s.append(2, 7);
        s.remove(2).unwrap();
        // Each model finds its own pages again; another adapter, none.
        s.enqueue(3, &system, 12, Some(0)).unwrap();
        s.enqueue(4, &system, 12, None).unwrap();
        s.enqueue(5, &system, 12, Some(1)).unwrap();
        assert_eq!(
            step_with_start(&mut s),
            [(3, 8, 2, true), (4, 8, 2, true), (5, 0, 10, true)]
        );
    }

    #[test]
    fn a_wholly_cached_prompt_still_feeds_its_last_token() {
        let mut s = Scheduler::new(limits(64, 4, 8), 100);
        s.enqueue(1, &prompt(1, 8), 9, None).unwrap();
        step(&mut s);
        s.remove(1).unwrap();
        assert_eq!(s.pages_cached(), 2);
        // Eight tokens, all cached: the second page is not taken (its last
        // token must be computed for its logits, and into a page of its own).
        s.enqueue(2, &prompt(1, 8), 9, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(2, 4, 4, true)]);
    }

    #[test]
    fn running_sequences_share_pages_and_generated_pages_are_cached_too() {
        let mut s = Scheduler::new(limits(64, 4, 8), 100);
        s.enqueue(1, &prompt(1, 6), 12, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(1, 0, 6, true)]);
        assert_eq!(s.pages_used(), 3);
        // While 1 decodes, 2 with the same first page joins: it holds that
        // page too, which is counted once.
        s.enqueue(2, &prompt(1, 6), 8, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(1, 6, 1, true), (2, 4, 2, true)]);
        assert_eq!(s.pages_used(), 3 + 1);
        // Request 1 generates up to 10 tokens (7s): page 1 fills with
        // generated tokens and is published as well.
        for _ in 0..3 {
            step(&mut s);
        }
        s.remove(1).unwrap();
        s.remove(2).unwrap();
        let mut follow_up = prompt(1, 6);
        follow_up.extend([7, 7, 7, 7, 9]);
        s.enqueue(3, &follow_up, 12, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(3, 8, 3, true)]);
    }

    #[test]
    fn without_prefix_caching_every_prompt_starts_at_zero() {
        let limits = Limits {
            prefix_caching: false,
            ..limits(64, 4, 8)
        };
        let mut s = Scheduler::new(limits, 100);
        s.enqueue(1, &prompt(1, 9), 12, None).unwrap();
        step(&mut s);
        s.remove(1).unwrap();
        s.enqueue(2, &prompt(1, 9), 12, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(2, 0, 9, true)]);
        assert_eq!(s.pages_cached(), 0);
    }

    #[test]
    fn a_prompt_computed_whole_reuses_nothing_but_is_published() {
        let mut s = Scheduler::new(limits(64, 4, 8), 100);
        s.enqueue(1, &prompt(1, 9), 12, None).unwrap();
        step(&mut s);
        s.remove(1).unwrap();
        assert_eq!(s.pages_cached(), 2);
        // Scored: from position 0 although two pages are cached; a prompt
        // of its own length and no room to generate (max_tokens 0) is fine.
        s.enqueue_whole(2, &prompt(1, 9), 9, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(2, 0, 9, true)]);
        s.remove(2).unwrap();
        // Its pages were published (the same blocks: the first copy stays).
        let mut longer = prompt(2, 12);
        s.enqueue_whole(3, &longer, 12, None).unwrap();
        step(&mut s);
        s.remove(3).unwrap();
        longer.push(5);
        s.enqueue(4, &longer, 16, None).unwrap();
        assert_eq!(step_with_start(&mut s), [(4, 12, 1, true)]);
    }

    #[test]
    fn scored_rows_are_bounded_per_step_and_flagged() {
        let mut s = Scheduler::new(limits(1024, 4, 8), 1000);
        let long = prompt(1, 2 * MAX_SCORED_ROWS + 10);
        s.enqueue_whole(1, &long, long.len() + 2, None).unwrap();
        s.enqueue_whole(2, &prompt(2, 5), 6, None).unwrap();
        s.enqueue(3, &prompt(3, 5), 6, None).unwrap();
        // Plans and completes a step: `(id, len, sample, score)` each.
        let step = |s: &mut Scheduler| {
            let work = s.plan();
            s.complete(&work);
            work.iter()
                .map(|w| (w.id, w.len, w.sample, w.score))
                .collect::<Vec<_>>()
        };
        // The second scored prompt waits (the bound is spent), and so does
        // the request behind it (first in, first out).
        assert_eq!(step(&mut s), [(1, MAX_SCORED_ROWS, false, true)]);
        assert_eq!(step(&mut s), [(1, MAX_SCORED_ROWS, false, true)]);
        assert_eq!(
            step(&mut s),
            [(1, 10, true, true), (2, 5, true, true), (3, 5, true, false)]
        );
        s.append(1, 7);
        // Its decode is not scored.
        let work = s.plan();
        assert_eq!((work[0].id, work[0].score), (1, false));
    }
}
