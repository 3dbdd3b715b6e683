//! The requests a transport source has handed to its worker, by tag: slots reused through a
//! free list, so a request allocates nothing once the table has grown to the peak in flight.

#[derive(Debug)]
pub(crate) struct Tags<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Tags<T> {
    fn default() -> Self {
        Tags {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Tags<T> {
    /// Files `value` and returns its tag.
    pub(crate) fn insert(&mut self, value: T) -> u64 {
        match self.free.pop() {
            Some(tag) => {
                self.slots[tag] = Some(value);
                tag as u64
            }
            None => {
                self.slots.push(Some(value));
                (self.slots.len() - 1) as u64
            }
        }
    }

    /// The value filed under `tag`, left filed.
    pub(crate) fn get(&self, tag: u64) -> Option<&T> {
        self.slots.get(tag as usize).and_then(Option::as_ref)
    }

    /// Takes the value filed under `tag`, freeing the tag; `None` for a tag not in use.
    pub(crate) fn take(&mut self, tag: u64) -> Option<T> {
        let value = self.slots.get_mut(tag as usize).and_then(Option::take)?;
        self.free.push(tag as usize);
        Some(value)
    }
}
