//! Namespace paths: absolute, `/`-separated, checked once at the edge.

use std::fmt;

use crate::error::ControlError;

/// Longest path, and longest name in it, in bytes (Linux's PATH_MAX and NAME_MAX).
pub const PATH_MAX: usize = 4096;
pub const NAME_MAX: usize = 255;
/// Deepest path: one transaction makes every missing directory of `mkdir -p`, and etcd takes
/// at most 128 operations in one by default.
pub const DEPTH_MAX: usize = 100;

/// A checked, normalised absolute path: `/` or `/a/b` (no trailing `/`, no empty, `.` or
/// `..` component, no NUL).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NsPath(String);

impl NsPath {
    pub fn root() -> NsPath {
        NsPath("/".to_owned())
    }

    /// Checks `text`; `field` names the argument in the error.
    pub fn parse(field: &str, text: &str) -> Result<NsPath, ControlError> {
        let bad = |why: &str| ControlError::InvalidArgument(format!("{field} {text:?}: {why}"));
        if text.is_empty() {
            return Err(bad("empty path"));
        }
        if !text.starts_with('/') {
            return Err(bad("not absolute (paths start with /)"));
        }
        if text.len() > PATH_MAX {
            return Err(bad(&format!("longer than {PATH_MAX} bytes")));
        }
        if text.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        let trimmed = text.trim_end_matches('/');
        if trimmed.is_empty() {
            return Ok(NsPath::root());
        }
        for (depth, name) in trimmed[1..].split('/').enumerate() {
            if depth == DEPTH_MAX {
                return Err(bad(&format!("deeper than {DEPTH_MAX} components")));
            }
            check_name(name).map_err(|why| bad(&why))?;
        }
        Ok(NsPath(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The names from the root down (none for `/`).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|name| !name.is_empty())
    }

    /// The parent and the last name; `None` for the root.
    pub fn split(&self) -> Option<(NsPath, &str)> {
        if self.is_root() {
            return None;
        }
        let cut = self.0.rfind('/').unwrap_or(0);
        let parent = if cut == 0 {
            NsPath::root()
        } else {
            NsPath(self.0[..cut].to_owned())
        };
        Some((parent, &self.0[cut + 1..]))
    }

    pub fn join(&self, name: &str) -> NsPath {
        if self.is_root() {
            NsPath(format!("/{name}"))
        } else {
            NsPath(format!("{}/{name}", self.0))
        }
    }

    /// Whether `self` is `other` or below it.
    pub fn starts_with(&self, other: &NsPath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes()[other.0.len()] == b'/')
    }

    /// `self` relative to `base` (`""` when equal); `None` when not below it.
    pub fn relative_to(&self, base: &NsPath) -> Option<&str> {
        if !self.starts_with(base) {
            return None;
        }
        if self.0 == base.0 {
            return Some("");
        }
        let skip = if base.is_root() { 1 } else { base.0.len() + 1 };
        Some(&self.0[skip..])
    }
}

impl fmt::Display for NsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `value` is a name of 1 to `max` bytes of ASCII letters, digits, `._-` and the
/// bytes of `extra` (node ids, snapshot names, tag keys).
pub fn is_identifier(value: &str, max: usize, extra: &[u8]) -> bool {
    (1..=max).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
}

/// One path component.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty component (//)".to_owned());
    }
    if name == "." || name == ".." {
        return Err(format!("component {name:?} is not allowed"));
    }
    if name.len() > NAME_MAX {
        return Err(format!("component longer than {NAME_MAX} bytes"));
    }
    if name.contains(['/', '\0']) {
        return Err("component contains / or NUL".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        assert_eq!(NsPath::parse("path", "/").unwrap(), NsPath::root());
        assert_eq!(NsPath::parse("path", "/a/b/").unwrap().as_str(), "/a/b");
        let path = NsPath::parse("path", "/a/b").unwrap();
        let (parent, name) = path.split().unwrap();
        assert_eq!((parent.as_str(), name), ("/a", "b"));
        assert_eq!(
            NsPath::parse("p", "/a").unwrap().split().unwrap().0,
            NsPath::root()
        );
        assert_eq!(path.names().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn refuses_bad_paths_naming_the_field() {
        for bad in ["", "a/b", "/a//b", "/a/./b", "/a/../b", "/a\0b"] {
            let error = NsPath::parse("destination", bad).unwrap_err().to_string();
            assert!(error.contains("destination"), "{bad:?}: {error}");
        }
        assert!(NsPath::parse("p", &format!("/{}", "x".repeat(256))).is_err());
    }

    #[test]
    fn prefixes_are_whole_components() {
        let base = NsPath::parse("p", "/data").unwrap();
        assert!(NsPath::parse("p", "/data/x").unwrap().starts_with(&base));
        assert!(!NsPath::parse("p", "/database").unwrap().starts_with(&base));
        assert_eq!(
            NsPath::parse("p", "/data/x/y").unwrap().relative_to(&base),
            Some("x/y")
        );
        assert_eq!(
            NsPath::parse("p", "/x")
                .unwrap()
                .relative_to(&NsPath::root()),
            Some("x")
        );
    }
}
