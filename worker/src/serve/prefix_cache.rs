//! The KV page pool, with automatic prefix caching: a page whose positions
//! are all computed is published under its content, the tokens it holds
//! after the prefix before it, and a later request whose prompt starts with
//! the same tokens takes those pages instead of computing them again. Chat
//! requests that share a system prompt, and every turn of a conversation
//! (which resends the ones before it), prefill only what is new.
//!
//! Why this is exact: the engine computes every row alone (a token's keys
//! and values depend only on the tokens before it, never on what else
//! shares its step), so a published page holds the very bits a new
//! request would compute into it.
//!
//! Bookkeeping, all pure:
//! - every page has a reference count: the sequences that hold it;
//! - a page nobody holds is either **free** (no content worth keeping) or
//!   **cached** (it holds a published block): both can be handed out, the
//!   free ones first, then the cached ones least recently released first;
//!   handing out a cached page unpublishes it;
//! - a block is named by its parent block and its tokens, and gets an id
//!   that is never reused: a block whose parent was evicted can no longer
//!   be reached from the root (and is evicted in its turn), so a match is
//!   always the whole chain from the first position, compared token by
//!   token, with no hash that could collide.
//!
//! Only whole pages are shared, and a sequence never writes into a page it
//! shares: a match ends before the prompt's last token, whose logits start
//! the completion, and the positions after it go to the sequence's own pages.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::serve::kv_cache::PageId;

/// Names a published block; [`ROOT`] is the empty prefix.
pub type BlockId = u64;
pub const ROOT: BlockId = 0;

/// The empty prefix of the model a sequence runs: [`ROOT`] for the base
/// model, its own root for each adapter (`serve/adapters.rs`), whose keys
/// and values differ from the base model's for the same tokens. Chains
/// from different roots never meet, so a prompt only ever matches pages
/// its own model computed. Published blocks count up from 1 and never
/// reach the adapters' roots, which count down from the top.
pub fn root(adapter: Option<usize>) -> BlockId {
    adapter.map_or(ROOT, |a| BlockId::MAX - a as BlockId)
}

/// A page was released that no sequence holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotAllocated(pub PageId);

impl fmt::Display for NotAllocated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KV page {} was freed but is not allocated", self.0)
    }
}

impl std::error::Error for NotAllocated {}

/// The pages of the longest cached prefix of some tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    /// One page per matched block, in order.
    pub pages: Vec<PageId>,
    /// The last matched block (the root when none matched): the parent of
    /// the next block the sequence publishes.
    pub last: BlockId,
}

type Key = (BlockId, Box<[u32]>);

/// The pages of the KV cache: who holds them and what they hold.
#[derive(Clone, Debug)]
pub struct PagePool {
    page_size: usize,
    /// Whether blocks are published and matched at all.
    caching: bool,
    /// Sequences holding each page.
    refs: Vec<u32>,
    /// Unheld pages without a published block; allocation pops from the
    /// end (the most recently freed page, still warm in the CPU caches).
    free: Vec<PageId>,
    /// Unheld pages holding a published block, by release order (the key
    /// counts up): the first is evicted first.
    cached: BTreeMap<u64, PageId>,
    /// Each page's place in `cached`.
    cached_at: Vec<Option<u64>>,
    next_release: u64,
    /// Published blocks: (parent, tokens) → (id, page).
    blocks: HashMap<Key, (BlockId, PageId)>,
    /// The key of the block each page holds, if published.
    published: Vec<Option<Key>>,
    next_block: BlockId,
}

impl PagePool {
    /// `pages` pages of `page_size` positions; `caching` turns prefix
    /// caching on (off, released pages are simply free again).
    pub fn new(pages: usize, page_size: usize, caching: bool) -> Self {
        let pages = u32::try_from(pages).unwrap_or(u32::MAX);
        let count = pages as usize;
        Self {
            page_size: page_size.max(1),
            caching,
            refs: vec![0; count],
            free: (0..pages).rev().collect(),
            cached: BTreeMap::new(),
            cached_at: vec![None; count],
            next_release: 0,
            blocks: HashMap::new(),
            published: vec![None; count],
            next_block: ROOT + 1,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Pages that can be handed out: free, or cached and unheld.
    pub fn available(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    /// Pages some sequence holds.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    /// Unheld pages kept for their published blocks.
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    /// The longest chain of published blocks that `tokens` starts with
    /// (whole pages only), from [`ROOT`].
    pub fn lookup(&self, tokens: &[u32]) -> Match {
        self.lookup_from(ROOT, tokens)
    }

    /// [`Self::lookup`] from `root` (see [`root`]).
    pub fn lookup_from(&self, root: BlockId, tokens: &[u32]) -> Match {
        let mut found = Match {
            pages: Vec::new(),
            last: root,
        };
        if !self.caching {
            return found;
        }
        for block in tokens.chunks_exact(self.page_size) {
            match self.blocks.get(&(found.last, block.into())) {
                Some(&(id, page)) => {
                    found.pages.push(page);
                    found.last = id;
                }
                None => break,
            }
        }
        found
    }

    /// Takes `matched` (a [`Self::lookup`] made since the last change) and
    /// `fresh` more pages, or nothing at all when they are not there: the
    /// matched pages then `fresh` new ones, each held once more.
    pub fn allocate_after(&mut self, matched: &[PageId], fresh: usize) -> Option<Vec<PageId>> {
        // Matched pages nobody holds are counted as available: taking them
        // leaves that many fewer for the fresh ones.
        let unheld = matched
            .iter()
            .filter(|&&p| self.refs[p as usize] == 0)
            .count();
        if fresh > self.available() - unheld {
            return None;
        }
        let mut pages = Vec::with_capacity(matched.len() + fresh);
        for &page in matched {
            if let Some(at) = self.cached_at[page as usize].take() {
                self.cached.remove(&at);
            }
            self.refs[page as usize] += 1;
            pages.push(page);
        }
        for _ in 0..fresh {
            let page = match self.free.pop() {
                Some(page) => page,
                None => self.evict()?,
            };
            self.refs[page as usize] = 1;
            pages.push(page);
        }
        Some(pages)
    }

    /// `count` new pages, or none at all when fewer are available (a
    /// sequence never holds part of what it needs).
    pub fn allocate(&mut self, count: usize) -> Option<Vec<PageId>> {
        self.allocate_after(&[], count)
    }

    /// The least recently released cached page, unpublished.
    fn evict(&mut self) -> Option<PageId> {
        let (_, page) = self.cached.pop_first()?;
        self.cached_at[page as usize] = None;
        if let Some(key) = self.published[page as usize].take() {
            self.blocks.remove(&key);
        }
        Some(page)
    }

    /// Publishes `page`, which holds the `page_size` `tokens` after block
    /// `parent`, and returns the block's id: the parent of the next. When
    /// another page already holds that block (two requests computed it at
    /// once), that block's id, and `page` stays unpublished.
    pub fn publish(&mut self, page: PageId, parent: BlockId, tokens: &[u32]) -> BlockId {
        debug_assert_eq!(
            tokens.len(),
            self.page_size,
            "only whole pages are published"
        );
        if !self.caching {
            return ROOT;
        }
        let key: Key = (parent, tokens.into());
        if let Some(&(id, _)) = self.blocks.get(&key) {
            return id;
        }
        let id = self.next_block;
        self.next_block += 1;
        if self.published[page as usize].is_some() {
            // A page holds one block: never rename it. (Unreachable while a
            // sequence publishes only pages it filled.) The id is a dead
            // end: no lookup reaches it, so nothing published after it in
            // this chain can be matched against the wrong prefix.
            return id;
        }
        self.blocks.insert(key.clone(), (id, page));
        self.published[page as usize] = Some(key);
        id
    }

    /// Releases one hold on each of `pages` (a sequence's, in order); stops
    /// at the first one nobody holds. A page nobody holds any more is free,
    /// or cached when it holds a published block; a sequence's later
    /// blocks are queued for eviction before its earlier ones, which other
    /// prompts are likelier to share.
    pub fn release(&mut self, pages: &[PageId]) -> Result<(), NotAllocated> {
        for &page in pages.iter().rev() {
            let refs = self
                .refs
                .get_mut(page as usize)
                .filter(|r| **r > 0)
                .ok_or(NotAllocated(page))?;
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            if self.published[page as usize].is_some() {
                let at = self.next_release;
                self.next_release += 1;
                self.cached.insert(at, page);
                self.cached_at[page as usize] = Some(at);
            } else {
                self.free.push(page);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pages: usize) -> PagePool {
        PagePool::new(pages, 2, true)
    }

    /// Publishes a sequence's pages for `tokens` (whole pages only).
    fn publish_all(pool: &mut PagePool, pages: &[PageId], tokens: &[u32]) {
        let mut parent = ROOT;
        for (&page, block) in pages.iter().zip(tokens.chunks_exact(pool.page_size())) {
            parent = pool.publish(page, parent, block);
        }
    }

    #[test]
    fn allocation_is_all_or_nothing_and_releases_return_pages() {
        let mut pool = pool(4);
        let a = pool.allocate(3).unwrap();
        assert_eq!((pool.used(), pool.available()), (3, 1));
        assert_eq!(pool.allocate(2), None, "only one page is free");
        assert_eq!(pool.available(), 1, "a refused allocation takes nothing");
        let b = pool.allocate(1).unwrap();
        assert!(
            a.iter().all(|p| !b.contains(p)),
            "fresh pages are never shared"
        );
        pool.release(&a).unwrap();
        pool.release(&b).unwrap();
        assert_eq!((pool.used(), pool.available(), pool.cached()), (0, 4, 0));
    }

    #[test]
    fn double_and_foreign_releases_are_refused() {
        let mut pool = pool(2);
        let a = pool.allocate(1).unwrap();
        pool.release(&a).unwrap();
        assert_eq!(pool.release(&a), Err(NotAllocated(a[0])));
        assert_eq!(pool.release(&[7]), Err(NotAllocated(7)));
        assert_eq!(pool.available(), 2);
    }

    #[test]
    fn a_released_prefix_is_found_whole_pages_only_and_shared() {
        let mut pool = pool(8);
        let first = pool.allocate(3).unwrap();
        publish_all(&mut pool, &first[..2], &[1, 2, 3, 4]);
        pool.release(&first).unwrap();
        assert_eq!((pool.cached(), pool.used()), (2, 0));

        // The same two blocks then a different one: two pages match.
        let found = pool.lookup(&[1, 2, 3, 4, 5]);
        assert_eq!(found.pages, first[..2]);
        // A different first block shares nothing, even if the second agrees.
        assert!(pool.lookup(&[9, 9, 3, 4]).pages.is_empty());
        // Half a page matches nothing.
        assert_eq!(pool.lookup(&[1, 2, 3]).pages, first[..1]);

        let second = pool.allocate_after(&found.pages, 2).unwrap();
        assert_eq!(second[..2], first[..2]);
        assert_eq!((pool.cached(), pool.used()), (0, 4));
        // Held twice: one more request shares them too, then all release.
        let third = pool.allocate_after(&found.pages, 0).unwrap();
        pool.release(&second).unwrap();
        assert_eq!(pool.cached(), 0, "still held by the third");
        pool.release(&third).unwrap();
        assert_eq!((pool.cached(), pool.used()), (2, 0));
    }

    #[test]
    fn cached_pages_are_handed_out_last_and_the_latest_blocks_first() {
        let mut pool = pool(4);
        let seq = pool.allocate(3).unwrap();
        publish_all(&mut pool, &seq, &[1, 2, 3, 4, 5, 6]);
        pool.release(&seq).unwrap();
        // One free page goes before any cached one.
        let a = pool.allocate(1).unwrap();
        assert!(!seq.contains(&a[0]));
        assert_eq!(pool.lookup(&[1, 2, 3, 4, 5, 6]).pages, seq);
        // Then the sequence's last block is evicted first: the chain's
        // head survives.
        let b = pool.allocate(1).unwrap();
        assert_eq!(b, [seq[2]]);
        assert_eq!(pool.lookup(&[1, 2, 3, 4, 5, 6]).pages, seq[..2]);
        let c = pool.allocate(2).unwrap();
        assert_eq!(c.len(), 2);
        assert!(
            pool.lookup(&[1, 2]).pages.is_empty(),
            "evicted blocks are gone"
        );
        assert_eq!(pool.allocate(1), None);
    }

    #[test]
    fn a_child_of_an_evicted_block_is_never_matched_again() {
        let mut pool = pool(3);
        let seq = pool.allocate(2).unwrap();
        publish_all(&mut pool, &seq, &[1, 2, 3, 4]);
        // Hold the child, release the parent alone, evict it, and publish
        // different tokens in the recycled page.
        pool.release(&seq[..1]).unwrap();
        let other = pool.allocate(2).unwrap();
        assert!(other.contains(&seq[0]), "the only cached page was taken");
        pool.publish(seq[0], ROOT, &[7, 7]);
        // [1, 2] is gone, so [1, 2, 3, 4] matches nothing, and [7, 7, 3, 4]
        // must not reach the old child [3, 4] through the recycled page.
        assert!(pool.lookup(&[1, 2, 3, 4]).pages.is_empty());
        assert_eq!(pool.lookup(&[7, 7, 3, 4]).pages, [seq[0]]);
    }

    #[test]
    fn matched_unheld_pages_count_against_the_fresh_ones() {
        let mut pool = pool(3);
        let seq = pool.allocate(2).unwrap();
        publish_all(&mut pool, &seq, &[1, 2, 3, 4]);
        pool.release(&seq).unwrap();
        let found = pool.lookup(&[1, 2, 3, 4, 5]);
        assert_eq!(found.pages.len(), 2);
        // 3 available, 2 of them the match: one fresh page fits, two do not.
        assert_eq!(pool.allocate_after(&found.pages, 2), None);
        assert_eq!(pool.available(), 3, "a refused allocation takes nothing");
        let pages = pool.allocate_after(&found.pages, 1).unwrap();
        assert_eq!(pages.len(), 3);
    }

    #[test]
    fn a_block_computed_twice_keeps_its_first_page() {
        let mut pool = pool(4);
        let a = pool.allocate(1).unwrap();
        let b = pool.allocate(1).unwrap();
        let first = pool.publish(a[0], ROOT, &[5, 6]);
        assert_eq!(pool.publish(b[0], ROOT, &[5, 6]), first);
        pool.release(&b).unwrap();
        assert_eq!(pool.cached(), 0, "the duplicate is free, not cached");
        pool.release(&a).unwrap();
        assert_eq!(pool.cached(), 1);
        assert_eq!(pool.lookup(&[5, 6]).pages, a);
    }

    #[test]
    fn without_caching_nothing_is_published_or_matched() {
        let mut pool = PagePool::new(4, 2, false);
        let seq = pool.allocate(2).unwrap();
        publish_all(&mut pool, &seq, &[1, 2, 3, 4]);
        pool.release(&seq).unwrap();
        assert_eq!(pool.cached(), 0);
        assert!(pool.lookup(&[1, 2, 3, 4]).pages.is_empty());
    }
}
