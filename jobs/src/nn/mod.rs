//! Neural-network layers shared by jobs, where candle's own are slow or missing.

pub mod conv;

pub use conv::GemmConv2d;
