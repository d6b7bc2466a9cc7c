//! Neural-network layers shared by jobs, where candle's own are slow or missing.

pub mod conv;
pub mod conv_transpose;
pub mod norm;

pub use conv::GemmConv2d;
pub use conv_transpose::GemmConvTranspose2d;
pub use norm::GroupNorm;
