//! Streaming slots (GATEWAY.md §3, back-pressure): at most `max` captures
//! stream at once; the others wait their turn in arrival order. Pure
//! bookkeeping: no clock, no IO; the engine says what to do with a grant.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

pub struct Slots<K> {
    max: usize,
    streaming: HashSet<K, ahash::RandomState>,
    waiting: VecDeque<K>,
    /// The keys in `waiting`, for membership without a scan.
    waiting_set: HashSet<K, ahash::RandomState>,
}

impl<K: Clone + Eq + Hash> Slots<K> {
    pub fn new(max: usize) -> Self {
        Slots {
            max,
            streaming: HashSet::default(),
            waiting: VecDeque::new(),
            waiting_set: HashSet::default(),
        }
    }

    /// True when `key` may stream now (it holds a slot, or one was free);
    /// false when it waits its turn (asking again keeps its place).
    pub fn request(&mut self, key: &K) -> bool {
        if self.streaming.contains(key) || self.streaming.len() < self.max {
            self.streaming.insert(key.clone());
            return true;
        }
        if self.waiting_set.insert(key.clone()) {
            self.waiting.push_back(key.clone());
        }
        false
    }

    /// Frees `key`'s slot or its place in line. Returns the keys that now
    /// hold a slot, in line order; a waiting key for which `wanted` is false
    /// is dropped from the line instead.
    pub fn release(&mut self, key: &K, wanted: impl Fn(&K) -> bool) -> Vec<K> {
        if self.waiting_set.remove(key) {
            self.waiting.retain(|k| k != key);
        }
        let mut granted = Vec::new();
        if self.streaming.remove(key) {
            while self.streaming.len() < self.max {
                let Some(next) = self.waiting.pop_front() else {
                    break;
                };
                self.waiting_set.remove(&next);
                if wanted(&next) {
                    self.streaming.insert(next.clone());
                    granted.push(next);
                }
            }
        }
        granted
    }

    pub fn is_streaming(&self, key: &K) -> bool {
        self.streaming.contains(key)
    }

    pub fn streaming(&self) -> impl Iterator<Item = &K> {
        self.streaming.iter()
    }

    /// The keys waiting, in line order.
    pub fn waiting(&self) -> impl Iterator<Item = &K> {
        self.waiting.iter()
    }

    /// (streaming, waiting).
    pub fn counts(&self) -> (usize, usize) {
        (self.streaming.len(), self.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_freed_slot_goes_to_the_first_in_line_that_still_wants_it() {
        let mut s = Slots::new(1);
        assert!(s.request(&1));
        assert!(!s.request(&2));
        assert!(!s.request(&3));
        assert!(!s.request(&2), "asking again keeps its place");
        assert_eq!(s.counts(), (1, 2));
        assert_eq!(s.release(&1, |k| *k != 2), vec![3]);
        assert_eq!(s.counts(), (1, 0));
        assert!(s.release(&9, |_| true).is_empty(), "not held: no effect");
        assert_eq!(s.release(&3, |_| true), Vec::<i32>::new());
        assert_eq!(s.counts(), (0, 0));
    }

    #[test]
    fn leaving_the_line_frees_nothing_and_grants_nothing() {
        let mut s = Slots::new(1);
        s.request(&1);
        s.request(&2);
        assert!(s.release(&2, |_| true).is_empty());
        assert_eq!(s.counts(), (1, 0));
    }

    proptest! {
        /// Against a model: never more than `max` streaming, nobody both
        /// streaming and waiting, the line served in order.
        #[test]
        fn slots_follow_the_model(max in 1usize..4, ops in proptest::collection::vec((any::<bool>(), 0u8..6), 0..60)) {
            let mut s = Slots::new(max);
            let mut streaming: Vec<u8> = Vec::new();
            let mut line: Vec<u8> = Vec::new();
            for (ask, k) in ops {
                if ask {
                    let now = s.request(&k);
                    let model = if streaming.contains(&k) || streaming.len() < max {
                        if !streaming.contains(&k) { streaming.push(k); }
                        true
                    } else {
                        if !line.contains(&k) { line.push(k); }
                        false
                    };
                    prop_assert_eq!(now, model);
                } else {
                    let granted = s.release(&k, |_| true);
                    line.retain(|x| *x != k);
                    let mut want = Vec::new();
                    if let Some(p) = streaming.iter().position(|x| *x == k) {
                        streaming.remove(p);
                        while streaming.len() < max && !line.is_empty() {
                            let n = line.remove(0);
                            streaming.push(n);
                            want.push(n);
                        }
                    }
                    prop_assert_eq!(granted, want);
                }
                prop_assert!(s.counts().0 <= max);
                prop_assert_eq!(s.counts(), (streaming.len(), line.len()));
                prop_assert_eq!(s.waiting().copied().collect::<Vec<_>>(), line.clone());
            }
        }
    }
}
