//! The key/value cache of one sequence.

/// Keys and values of every layer for up to `capacity` positions, in f32 or (as llama.cpp keeps them by
/// default) in f16, with the tokens they came from (so a caller can reuse the common prefix of a new prompt).
/// [`Model::new_cache`](super::Model::new_cache) picks f16 for the `llama-cpu` arithmetic on the CPU, whose
/// keys and values are f16-rounded before they are stored (so the half-size cache changes no bit), and f32
/// otherwise.
///
/// Layout per layer: `[kv_head][position][head_dim]`, so one KV head's keys are a contiguous
/// `positions × head_dim` matrix for the attention GEMMs. The buffers are allocated zeroed for the whole
/// capacity up front; the OS only commits the pages that get written.
///
/// On the GPU backend a copy lives on the device too ([`KvCache::device`]): the first `device_len`
/// positions there equal the host's. The host copy holds the first `host_len` positions: the GPU forward
/// reads its new rows back (so a cache moves between backends freely and a clone starts without a device
/// copy), except for the evaluation's device-only passes, whose rows are read back only if the host
/// path needs them; a clone keeps the positions the host holds.
pub struct KvCache {
    /// The f32 store's keys and values per layer (no layers when the cache is f16).
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    /// The f16 store's, as little-endian f16 bytes in the same layout (no layers when the cache is f32).
    k16: Vec<Vec<u8>>,
    v16: Vec<Vec<u8>>,
    pub(crate) device: Option<crate::backend::wgpu::ops::DeviceKv>,
    pub(crate) device_len: usize,
    /// Positions the host arrays hold (the rest are only on the device).
    pub(crate) host_len: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    capacity: usize,
    tokens: Vec<u32>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("layers", &self.layers())
            .field("f16", &self.is_f16())
            .field("kv_heads", &self.kv_heads)
            .field("head_dim", &self.head_dim)
            .field("len", &self.tokens.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        Self {
            k: self.k.clone(),
            v: self.v.clone(),
            k16: self.k16.clone(),
            v16: self.v16.clone(),
            device: None,
            device_len: 0,
            host_len: self.host_len,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            capacity: self.capacity,
            tokens: self.tokens[..self.host_len.min(self.tokens.len())].to_vec(),
        }
    }
}

impl KvCache {
    pub(crate) fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        f16: bool,
    ) -> Self {
        let per_layer = kv_heads * capacity * head_dim;
        let (f32s, f16s) = if f16 { (0, layers) } else { (layers, 0) };
        Self {
            k: (0..f32s).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..f32s).map(|_| vec![0.0; per_layer]).collect(),
            k16: (0..f16s).map(|_| vec![0; 2 * per_layer]).collect(),
            v16: (0..f16s).map(|_| vec![0; 2 * per_layer]).collect(),
            device: None,
            device_len: 0,
            host_len: 0,
            kv_heads,
            head_dim,
            capacity,
            tokens: Vec::new(),
        }
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Forget every position.
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.device_len = 0;
        self.host_len = 0;
    }

    /// Keep only the first `n` positions (no-op when `n >= len`).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.device_len = self.device_len.min(n);
        self.host_len = self.host_len.min(n);
    }

    /// Most positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.capacity - self.tokens.len()
    }

    /// The tokens whose keys and values are held, in position order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of layers this cache was sized for.
    pub fn layers(&self) -> usize {
        self.k.len().max(self.k16.len())
    }

    /// Whether keys and values are stored in f16 (else f32).
    pub fn is_f16(&self) -> bool {
        !self.k16.is_empty()
    }

    /// Bytes allocated for keys and values (the committed part may be smaller).
    pub fn allocated_bytes(&self) -> usize {
        let elem = if self.is_f16() { 2 } else { 4 };
        2 * self.layers() * self.kv_heads * self.capacity * self.head_dim * elem
    }

    /// Layer `layer`'s keys and values as stored.
    pub(crate) fn layer(&self, layer: usize) -> KvLayer<'_> {
        if self.is_f16() {
            KvLayer::F16(&self.k16[layer], &self.v16[layer])
        } else {
            KvLayer::F32(&self.k[layer], &self.v[layer])
        }
    }

    /// Whether both caches hold the same tokens and, for them, the same stored bits (and store type).
    pub fn same_held(&self, other: &Self) -> bool {
        if self.tokens != other.tokens
            || self.is_f16() != other.is_f16()
            || self.layers() != other.layers()
            || (self.kv_heads, self.head_dim) != (other.kv_heads, other.head_dim)
        {
            return false;
        }
        let (hd, n) = (self.head_dim, self.len());
        let held =
            |cap: usize, g: usize, elem: usize| (g * cap * hd * elem)..((g * cap + n) * hd * elem);
        (0..self.layers()).all(|l| {
            (0..self.kv_heads).all(|g| match (self.layer(l), other.layer(l)) {
                (KvLayer::F32(ka, va), KvLayer::F32(kb, vb)) => {
                    let (ra, rb) = (held(self.capacity, g, 1), held(other.capacity, g, 1));
                    ka[ra.clone()] == kb[rb.clone()] && va[ra] == vb[rb]
                }
                (KvLayer::F16(ka, va), KvLayer::F16(kb, vb)) => {
                    let (ra, rb) = (held(self.capacity, g, 2), held(other.capacity, g, 2));
                    ka[ra.clone()] == kb[rb.clone()] && va[ra] == vb[rb]
                }
                _ => false,
            })
        })
    }

    /// Store keys and values of `n` new positions from `pos` on for `layer`: `k`/`v` are `[n, kv_heads·head_dim]`.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.device_len = self.device_len.min(pos);
        let (hd, kvh, cap) = (self.head_dim, self.kv_heads, self.capacity);
        let n = k.len() / (kvh * hd);
        debug_assert!(pos + n <= cap);
        if self.is_f16() {
            let (kc, vc) = (&mut self.k16[layer], &mut self.v16[layer]);
            for t in 0..n {
                for g in 0..kvh {
                    let src = t * kvh * hd + g * hd;
                    let dst = 2 * (g * cap + pos + t) * hd;
                    crate::simd::f32_to_f16(&k[src..src + hd], &mut kc[dst..dst + 2 * hd]);
                    crate::simd::f32_to_f16(&v[src..src + hd], &mut vc[dst..dst + 2 * hd]);
                }
            }
            return;
        }
        let (kc, vc) = (&mut self.k[layer], &mut self.v[layer]);
        for t in 0..n {
            for g in 0..kvh {
                let src = t * kvh * hd + g * hd;
                let dst = (g * cap + pos + t) * hd;
                kc[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                vc[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    /// Record that `tokens` now occupy the next positions, held by the host (`host`) or on the device only.
    pub(crate) fn push_tokens(&mut self, tokens: &[u32], host: bool) {
        self.tokens.extend_from_slice(tokens);
        if host {
            self.host_len = self.tokens.len();
        }
    }
}

/// One layer's keys and values as stored (`[kv_head][position][head_dim]`).
pub(crate) enum KvLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    /// Little-endian f16 bytes.
    F16(&'a [u8], &'a [u8]),
}
