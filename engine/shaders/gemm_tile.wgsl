// The tiled GEMM's core, shared by `gemm.wgsl` and the grouped formats' `gemm` entry (`grouped.wgsl`):
// 64 × 64 output tiles per workgroup of 16 × 16 invocations, each accumulating 4 × 4 outputs from BK-deep
// slices of x and W staged in workgroup memory (BK comes from the file that stages W).
const BM: u32 = 64u;
const BN: u32 = 64u;

var<workgroup> xs: array<f32, BK * BM>; // [BK][BM]
var<workgroup> ws: array<f32, BK * BN>; // [BK][BN]

// acc[a · 4 + c] += Σ_kk xs[kk, 4·ty + a] · ws[kk, 4·tx + c] over the staged slice.
fn tile_mac(ty: u32, tx: u32, acc: ptr<function, array<f32, 16>>) {
    for (var kk = 0u; kk < BK; kk++) {
        var xr: array<f32, 4>;
        var wr: array<f32, 4>;
        for (var a = 0u; a < 4u; a++) {
            xr[a] = xs[kk * BM + ty * 4u + a];
            wr[a] = ws[kk * BN + tx * 4u + a];
        }
        for (var a = 0u; a < 4u; a++) {
            for (var c = 0u; c < 4u; c++) {
                (*acc)[a * 4u + c] = fma(xr[a], wr[c], (*acc)[a * 4u + c]);
            }
        }
    }
}
