pub mod bench;
pub mod serve;
pub mod topology;
