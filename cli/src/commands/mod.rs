pub mod bench;
pub mod topology;
