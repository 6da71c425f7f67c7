//! The open route labels of one session: a sorted set that costs one pointer while empty,
//! which is what most of a server's connections (idle, pre-opened) are. A `Vec` would cost
//! three words on every connection.

// The box is the point: one word inline, the Vec's three only while a route is open.
#[allow(clippy::box_collection)]
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct LabelSet(Option<Box<Vec<u64>>>);

impl LabelSet {
    pub fn as_slice(&self) -> &[u64] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn contains(&self, label: u64) -> bool {
        self.as_slice().binary_search(&label).is_ok()
    }

    /// Adds `label`; false if it was there already.
    pub fn insert(&mut self, label: u64) -> bool {
        let v = self.0.get_or_insert_with(Default::default);
        match v.binary_search(&label) {
            Ok(_) => false,
            Err(pos) => {
                v.insert(pos, label);
                true
            }
        }
    }

    /// Removes `label`; false if it was not there. The heap goes with the last label.
    pub fn remove(&mut self, label: u64) -> bool {
        let Some(v) = self.0.as_mut() else { return false };
        let Ok(i) = v.binary_search(&label) else { return false };
        v.remove(i);
        if v.is_empty() {
            self.0 = None;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::LabelSet;

    #[test]
    fn stays_sorted_and_frees_its_heap_when_empty() {
        assert_eq!(std::mem::size_of::<LabelSet>(), std::mem::size_of::<usize>());
        let mut s = LabelSet::default();
        assert!(s.insert(7) && s.insert(3) && s.insert(9));
        assert!(!s.insert(3));
        assert_eq!(s.as_slice(), &[3, 7, 9]);
        assert!(s.contains(7) && !s.contains(8));
        assert!(s.remove(7) && !s.remove(7));
        assert_eq!(s.len(), 2);
        assert!(s.remove(3) && s.remove(9));
        assert_eq!(s, LabelSet::default());
        assert!(!s.remove(1));
    }
}
