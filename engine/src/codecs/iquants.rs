//! Non-linear 4-bit grids: IQ4_NL and IQ4_XS.
pub const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
pub fn dequant_iq4_nl(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_iq4_xs(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
