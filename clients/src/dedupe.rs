//! Bounded window of recently seen article ids, to drop QoS 1 redeliveries.

use std::collections::{HashSet, VecDeque};

/// Default number of ids remembered by the subscriber.
pub const DEFAULT_DEDUPE_WINDOW: usize = 10_000;

/// Remembers the last `capacity` distinct ids (FIFO eviction).
#[derive(Debug, Clone)]
pub struct DedupeWindow {
    capacity: usize,
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl DedupeWindow {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::with_capacity(capacity.min(1024)),
            seen: HashSet::with_capacity(capacity.min(1024)),
        }
    }

    /// Records `id`; returns `true` if it is new, `false` if it is still in the window.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.capacity == 0 {
            return true;
        }
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.order.push_back(id.to_owned());
        self.seen.insert(id.to_owned());
        true
    }

    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Default for DedupeWindow {
    fn default() -> Self {
        Self::new(DEFAULT_DEDUPE_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_sighting_is_a_duplicate() {
        let mut w = DedupeWindow::new(3);
        assert!(w.insert("a"));
        assert!(w.insert("b"));
        assert!(!w.insert("a"));
        assert!(!w.insert("b"));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn oldest_id_is_forgotten_when_window_is_full() {
        let mut w = DedupeWindow::new(3);
        for id in ["a", "b", "c", "d"] {
            assert!(w.insert(id));
        }
        assert_eq!(w.len(), 3);
        assert!(!w.contains("a"));
        assert!(w.contains("d"));
        // "a" fell out of the window, so it counts as new again (and evicts "b").
        assert!(w.insert("a"));
        assert!(!w.contains("b"));
        assert!(!w.insert("c"));
    }

    #[test]
    fn memory_stays_bounded() {
        let mut w = DedupeWindow::new(100);
        for i in 0..10_000 {
            w.insert(&i.to_string());
        }
        assert_eq!(w.len(), 100);
        assert!(w.contains("9999") && w.contains("9900") && !w.contains("9899"));
    }

    #[test]
    fn zero_capacity_never_reports_duplicates() {
        let mut w = DedupeWindow::new(0);
        assert!(w.insert("x"));
        assert!(w.insert("x"));
        assert!(w.is_empty());
    }
}
