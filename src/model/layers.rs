//! The layer table of rln-spec.md §4: canonical names, the authors' TF names, channel
//! counts and batch norms. Everything else (weights file, TF import, init, the network)
//! is driven by this table.

/// What a layer computes before its (optional) batch norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerOp {
    /// 3×3×3 cross-correlation, zero padding 1, no bias. Engine layout [out, in, 3, 3, 3].
    Conv3,
    /// 2×2×2 transposed conv, stride 2. Engine layout [in, out, 2, 2, 2].
    Up2,
    /// No weights: a batch norm on a one-channel node (the RL division or update).
    BnOnly,
}

#[derive(Clone, Copy, Debug)]
pub struct LayerSpec {
    pub name: &'static str,
    pub op: LayerOp,
    /// The authors' TF variable name of the weight (None for BnOnly).
    pub tf_weight: Option<&'static str>,
    /// Input channels with a one-channel network input (see [`LayerSpec::c_in_for`]).
    pub c_in: usize,
    pub c_out: usize,
    /// The authors' TF batch norm scope (None: no batch norm).
    pub tf_bn: Option<&'static str>,
    /// Takes the raw network input: with the dual-view "concat" variant it has one
    /// input channel per view.
    pub reads_input: bool,
}

impl LayerSpec {
    pub const fn has_bn(&self) -> bool {
        self.tf_bn.is_some()
    }
    /// Channels entering the layer for a network input of `input_channels` channels.
    pub const fn c_in_for(&self, input_channels: usize) -> usize {
        if self.reads_input {
            input_channels
        } else {
            self.c_in
        }
    }
    /// Number of weights, or 0 for a BnOnly layer.
    pub const fn weight_len(&self, input_channels: usize) -> usize {
        match self.op {
            LayerOp::Conv3 => self.c_out * self.c_in_for(input_channels) * 27,
            LayerOp::Up2 => self.c_out * self.c_in_for(input_channels) * 8,
            LayerOp::BnOnly => 0,
        }
    }
    /// Engine (PyTorch) layout of the weight.
    pub fn weight_shape(&self, input_channels: usize) -> Vec<usize> {
        let ci = self.c_in_for(input_channels);
        match self.op {
            LayerOp::Conv3 => vec![self.c_out, ci, 3, 3, 3],
            LayerOp::Up2 => vec![ci, self.c_out, 2, 2, 2],
            LayerOp::BnOnly => vec![],
        }
    }
    /// Channels of the batch norm (the layer's output channels).
    pub const fn bn_channels(&self) -> usize {
        self.c_out
    }
}

macro_rules! layer {
    ($name:expr, $op:ident, $tfw:expr, $ci:expr, $co:expr, $bn:expr, $input:expr) => {
        LayerSpec {
            name: $name,
            op: LayerOp::$op,
            tf_weight: $tfw,
            c_in: $ci,
            c_out: $co,
            tf_bn: $bn,
            reads_input: $input,
        }
    };
}

/// Index of each layer in [`LAYERS`], in spec order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum L {
    H1FpConv1 = 0,
    H1FpConv2,
    H1FpConv3,
    H1Dv,
    H1BpConv1,
    H1BpConv2,
    H1BpConv3,
    H1BpUp,
    H1BpConv4,
    H1E,
    H2FpConv1,
    H2FpConv2,
    H2Dv,
    H2BpConv1,
    H2BpConv2,
    H2E,
    H3Conv1,
    H3Conv2,
    H3Conv3,
}

impl L {
    pub const fn spec(self) -> &'static LayerSpec {
        &LAYERS[self as usize]
    }
}

pub const NUM_LAYERS: usize = 19;

/// rln-spec.md §4, row by row.
pub const LAYERS: [LayerSpec; NUM_LAYERS] = [
    layer!(
        "h1.fp.conv1",
        Conv3,
        Some("estimation/e_1"),
        1,
        4,
        Some("batch_normalization"),
        true
    ),
    layer!(
        "h1.fp.conv2",
        Conv3,
        Some("estimation/e_2"),
        4,
        4,
        Some("batch_normalization_1"),
        false
    ),
    layer!(
        "h1.fp.conv3",
        Conv3,
        Some("estimation/e_3"),
        8,
        4,
        Some("batch_normalization_2"),
        false
    ),
    layer!("h1.dv", BnOnly, None, 1, 1, Some("batch_normalization_3"), false),
    layer!(
        "h1.bp.conv1",
        Conv3,
        Some("estimation/init_w/e_4"),
        1,
        8,
        Some("batch_normalization_4"),
        false
    ),
    layer!(
        "h1.bp.conv2",
        Conv3,
        Some("estimation/init_w_1/e_5"),
        8,
        8,
        Some("batch_normalization_5"),
        false
    ),
    layer!(
        "h1.bp.conv3",
        Conv3,
        Some("estimation/init_w_2/e_6"),
        16,
        8,
        Some("batch_normalization_6"),
        false
    ),
    layer!(
        "h1.bp.up",
        Up2,
        Some("estimation/init_w_3/e_7"),
        8,
        4,
        Some("batch_normalization_7"),
        false
    ),
    layer!(
        "h1.bp.conv4",
        Conv3,
        Some("estimation/init_w_4/e_8"),
        4,
        4,
        Some("batch_normalization_8"),
        false
    ),
    layer!("h1.e", BnOnly, None, 1, 1, Some("batch_normalization_9"), false),
    layer!(
        "h2.fp.conv1",
        Conv3,
        Some("update/u_1"),
        1,
        4,
        Some("batch_normalization_10"),
        true
    ),
    layer!(
        "h2.fp.conv2",
        Conv3,
        Some("update/u_2"),
        4,
        4,
        Some("batch_normalization_11"),
        false
    ),
    layer!("h2.dv", BnOnly, None, 1, 1, Some("batch_normalization_12"), false),
    layer!(
        "h2.bp.conv1",
        Conv3,
        Some("update/init_w/u_3"),
        1,
        8,
        Some("batch_normalization_13"),
        false
    ),
    layer!(
        "h2.bp.conv2",
        Conv3,
        Some("update/init_w_1/u_4"),
        8,
        8,
        Some("batch_normalization_14"),
        false
    ),
    layer!("h2.e", BnOnly, None, 1, 1, Some("batch_normalization_15"), false),
    layer!("h3.conv1", Conv3, Some("update/init_w_2/u_5"), 1, 8, None, false),
    layer!("h3.conv2", Conv3, Some("update/init_w_3/u_6"), 10, 8, None, false),
    layer!(
        "h3.conv3",
        Conv3,
        Some("update/init_w_4/u_7"),
        16,
        8,
        Some("batch_normalization_16"),
        false
    ),
];

/// The forward-projection convs, initialized as Gaussian blobs (spec §4).
pub const FP_CONVS: [L; 5] = [L::H1FpConv1, L::H1FpConv2, L::H1FpConv3, L::H2FpConv1, L::H2FpConv2];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_spec_counts() {
        // spec §4: 15 808 conv weights and 80 BN channels with a one-channel input
        let weights: usize = LAYERS.iter().map(|l| l.weight_len(1)).sum();
        let bn: usize = LAYERS.iter().filter(|l| l.has_bn()).map(|l| l.bn_channels()).sum();
        assert_eq!(weights, 15_808);
        assert_eq!(bn, 80);
        for (i, l) in LAYERS.iter().enumerate() {
            assert_eq!(
                i,
                [
                    L::H1FpConv1,
                    L::H1FpConv2,
                    L::H1FpConv3,
                    L::H1Dv,
                    L::H1BpConv1,
                    L::H1BpConv2,
                    L::H1BpConv3,
                    L::H1BpUp,
                    L::H1BpConv4,
                    L::H1E,
                    L::H2FpConv1,
                    L::H2FpConv2,
                    L::H2Dv,
                    L::H2BpConv1,
                    L::H2BpConv2,
                    L::H2E,
                    L::H3Conv1,
                    L::H3Conv2,
                    L::H3Conv3
                ][i] as usize,
                "{}",
                l.name
            );
        }
    }
}
