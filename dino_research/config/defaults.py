"""Every configuration key of dino_research, with its default.

The defaults are the DINO paper's ViT-S/16 recipe (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", and the reference implementation's ``main_dino.py``).
Each default carries the type a value must have: yacs rejects ``SOLVER.BASE_LR 1`` (an int where a
float is expected) and any key that is not listed here, so a typo can never be silently ignored.

Leaf configs under ``configs/`` hold only what differs from these values.
"""

from .config import CfgNode as CN

_C = CN()

# Version of the config layout; bumped when keys are renamed so old files fail loudly.
_C.VERSION = 1

# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------
_C.MODEL = CN()
# Meta-architecture (META_ARCH_REGISTRY name): ties backbone, head, loss and teacher together.
_C.MODEL.META_ARCHITECTURE = "DINO"
# Path (local or iopath URI) of weights to initialize from; "" trains from scratch. Nothing is ever
# downloaded: hub names are not accepted here.
_C.MODEL.WEIGHTS = ""
# Accept a MODEL.WEIGHTS file that fits the model only partly (another depth, blocks missing, extra
# keys): the weights that fit are loaded, the others keep their initialization, and every missing and
# unexpected key is logged. False: such a file is an error naming the keys. Shapes must always fit; a
# file without head weights is never partial (the heads keep their initialization).
_C.MODEL.WEIGHTS_PARTIAL = False
# Where to train: "auto" (the local CUDA device of this process if there is one, else the CPU),
# "cpu" or "cuda".
_C.MODEL.DEVICE = "auto"
# torch.compile the backbones' training forward (student and teacher; evaluations run them
# uncompiled): "" (off), "static" (one graph per crop size, the default to try: two crop sizes give
# two graphs per network) or "dynamic" (shapes symbolic: fewer compilations, often slower steps).
# The first step of each crop size pays the compilation (minutes on a small CPU); on CPU inductor
# needs a C++ compiler. Off by default until it pays: measure with tools/bench_training.py
# MODEL.COMPILE static. Same weights and checkpoint keys as uncompiled.
_C.MODEL.COMPILE = ""

_C.MODEL.BACKBONE = CN()
# BACKBONE_REGISTRY name: vit_tiny, vit_small, vit_base (DINO's ViTs on timm), resnet50
# (torchvision, classifier removed), cifar_resnet (a ResNet for 28-64 pixel images) or timm (any
# timm model, named by TIMM_MODEL).
_C.MODEL.BACKBONE.NAME = "vit_small"
# ViT patch size in pixels: 16 or 8 for the paper's models (8 costs ~4x the compute of 16).
_C.MODEL.BACKBONE.PATCH_SIZE = 16
# Stochastic depth rate of the *student* backbone (paper: 0.1). The teacher always uses 0.
_C.MODEL.BACKBONE.DROP_PATH_RATE = 0.1
# Number of transformer blocks of the ViTs; 0 keeps the architecture's 12. Shallower ViTs are for
# quick experiments on small images (the CPU Fashion-MNIST config uses 4); not a paper setting.
# For cifar_resnet: the ResNet depth, 18, 34 or 50 (0 means 18).
_C.MODEL.BACKBONE.DEPTH = 0
# Attention heads of the ViTs; 0 keeps the architecture's (3 for vit_tiny, 6 small, 12 base). Must
# divide the width (192, 384, 768). More heads: more, narrower attention maps per block.
_C.MODEL.BACKBONE.NUM_HEADS = 0
# Base width (channels of the stem and first stage) of cifar_resnet, the CIFAR-style ResNet for
# small images (3x3 stride-1 stem, no max-pool): 64 as the original ResNet; 32 costs ~1/4 of it.
_C.MODEL.BACKBONE.RESNET_WIDTH = 64
# timm model name used when NAME is "timm" (e.g. "convnext_tiny", "xcit_small_12_p16_224").
# Built with pretrained=False: weights only come from MODEL.WEIGHTS.
_C.MODEL.BACKBONE.TIMM_MODEL = ""
# Output stride of a timm convnet that supports it (ResNets, ConvNeXts, ...: timm's output_stride,
# dilating the last stages instead of striding); 0 keeps the model's own (32 for a ResNet). On
# 28-pixel images a ResNet-18 ends on a 1x1 map; 8 keeps a 4x4 one, at ~4.5x the cost per image
# (README "What was tried").
_C.MODEL.BACKBONE.TIMM_OUTPUT_STRIDE = 0
# Channels-last (NHWC) memory layout for a convnet backbone's weights and inputs: the same values,
# a different speed. Measured on a 2-core AVX-512 CPU, training step at 28 px: cifar_resnet width 32
# 1.25x faster (float32 and bfloat16); timm's resnet18 equal in float32 and 0.73x under bfloat16
# (a forward + backward of 2x28 + 4x14-pixel crops). Measure before turning it on, e.g.
# tools/bench_training.py MODEL.BACKBONE.NAME cifar_resnet MODEL.BACKBONE.CHANNELS_LAST True ...
# No effect on a ViT.
_C.MODEL.BACKBONE.CHANNELS_LAST = False
# ViTs on a CPU under bfloat16 autocast: compute the attention kernel (F.scaled_dot_product_attention)
# in float32, the rest of the step in bfloat16. "auto": on when the CPU has no AMX tiles, where
# torch's bfloat16 flash attention is slower than its float32 one (ViT-S/16 step on a 2-core
# AVX512_BF16 CPU: attention backward 963 ms in bfloat16 against 323 ms in float32, see README
# Benchmarks); "on" / "off" force it. No effect in float32, on GPUs or on convnets.
_C.MODEL.BACKBONE.CPU_ATTENTION_FLOAT32 = "auto"

_C.MODEL.HEAD = CN()
# HEAD_REGISTRY name of the projection head put on top of the backbone.
_C.MODEL.HEAD.NAME = "DINOHead"
# Number of prototypes K, the dimension of the softmax outputs (paper: 65536).
_C.MODEL.HEAD.OUT_DIM = 65536
# Width of the hidden MLP layers (paper: 2048).
_C.MODEL.HEAD.HIDDEN_DIM = 2048
# Width of the bottleneck before L2 normalization and the prototype layer (paper: 256).
_C.MODEL.HEAD.BOTTLENECK_DIM = 256
# Number of Linear layers of the MLP, the bottleneck layer included (paper: 3).
_C.MODEL.HEAD.NUM_LAYERS = 3
# BatchNorm between the MLP layers. The paper uses none for ViTs; its ResNet-50 recipe uses it.
_C.MODEL.HEAD.USE_BN = False
# Freeze the weight-norm gain of the prototype layer at 1 (paper: True for ViT-S stability).
_C.MODEL.HEAD.NORM_LAST_LAYER = True

_C.MODEL.LOSS = CN()
# LOSS_REGISTRY name.
_C.MODEL.LOSS.NAME = "DINOLoss"
# Student softmax temperature tau_s (paper: 0.1).
_C.MODEL.LOSS.STUDENT_TEMP = 0.1
# Teacher softmax temperature tau_t after warmup (paper: 0.04; 0.07 is safer for long warmups).
_C.MODEL.LOSS.TEACHER_TEMP = 0.04
# Teacher temperature at epoch 0; rises linearly to TEACHER_TEMP over WARMUP_TEACHER_TEMP_EPOCHS.
_C.MODEL.LOSS.WARMUP_TEACHER_TEMP = 0.04
# Epochs of teacher-temperature warmup (paper ViT-S/16 100ep: 0; 30 with TEACHER_TEMP 0.07).
_C.MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS = 0
# EMA rate m of the center: center = m * center + (1 - m) * batch mean (paper: 0.9).
_C.MODEL.LOSS.CENTER_MOMENTUM = 0.9
# SCHEDULER_REGISTRY name shaping the teacher temperature; evaluated per epoch, as in the paper.
_C.MODEL.LOSS.TEACHER_TEMP_SCHEDULER = "constant"

_C.MODEL.TEACHER = CN()
# EMA_REGISTRY name: how a momentum is applied to the teacher. "ParamEMA" is the paper's rule
# (parameters only); "ParamAndBufferEMA" also averages floating buffers (BatchNorm statistics).
_C.MODEL.TEACHER.EMA = "ParamEMA"
# Teacher momentum at iteration 0; follows MOMENTUM_SCHEDULER to 1.0 at the end (paper: 0.996).
_C.MODEL.TEACHER.MOMENTUM = 0.996
# Momentum at the last iteration (paper: 1.0).
_C.MODEL.TEACHER.MOMENTUM_END = 1.0
# SCHEDULER_REGISTRY name shaping the teacher momentum (paper: cosine).
_C.MODEL.TEACHER.MOMENTUM_SCHEDULER = "cosine"

# ---------------------------------------------------------------------------------------------------
# Input / multi-crop augmentation
# ---------------------------------------------------------------------------------------------------
_C.INPUT = CN()
# AUGMENTATION_REGISTRY name: image -> list of crops, the global crops first.
_C.INPUT.AUGMENTATION = "DINOMultiCrop"
# Side of the two global crops in pixels (paper: 224).
_C.INPUT.GLOBAL_CROP_SIZE = 224
# Area range of RandomResizedCrop for global crops, as fractions of the image (paper: 0.4 to 1.0).
_C.INPUT.GLOBAL_CROPS_SCALE = (0.4, 1.0)
# Number of small local crops seen by the student only (paper: 8; 0 disables multi-crop).
_C.INPUT.LOCAL_CROPS_NUMBER = 8
# Side of the local crops in pixels (paper: 96).
_C.INPUT.LOCAL_CROP_SIZE = 96
# Area range of RandomResizedCrop for local crops (paper: 0.05 to 0.4).
_C.INPUT.LOCAL_CROPS_SCALE = (0.05, 0.4)
# Aspect-ratio range of every RandomResizedCrop (torchvision's default, as the paper).
_C.INPUT.CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Probability of a horizontal flip, every crop (paper: 0.5).
_C.INPUT.FLIP_PROB = 0.5
# ColorJitter (brightness, contrast, saturation, hue) strengths (paper: 0.4, 0.4, 0.2, 0.1).
_C.INPUT.COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
# Probability that the color jitter is applied, every crop (paper: 0.8).
_C.INPUT.COLOR_JITTER_PROB = 0.8
# Probability of converting to grayscale, every crop (paper: 0.2).
_C.INPUT.GRAYSCALE_PROB = 0.2
# Gaussian blur radius range in pixels, drawn uniformly per application (paper: 0.1 to 2.0).
_C.INPUT.BLUR_RADIUS = (0.1, 2.0)
# Blur probability for the first and the second global crop (paper: 1.0 and 0.1).
_C.INPUT.GLOBAL_BLUR_PROBS = (1.0, 0.1)
# Blur probability for each local crop (paper: 0.5).
_C.INPUT.LOCAL_BLUR_PROB = 0.5
# Solarization probability for the first and the second global crop (paper: 0.0 and 0.2).
_C.INPUT.GLOBAL_SOLARIZE_PROBS = (0.0, 0.2)
# Solarization threshold on the 0-255 scale (PIL's ImageOps.solarize default, as the paper).
_C.INPUT.SOLARIZE_THRESHOLD = 128
# Per-channel normalization, RGB order, 0-1 scale (ImageNet statistics, as the paper).
_C.INPUT.MEAN = (0.485, 0.456, 0.406)
_C.INPUT.STD = (0.229, 0.224, 0.225)
# Split the multi-crop augmentation between the data-loader workers and the training device. The
# workers draw every random parameter, crop, resize and flip (uint8), and send the draws with the
# crops; the training process applies the colour jitter, grayscale, blur, solarization and
# normalization batched on its device before the forward pass. The same draws and operations: on a
# CPU the crops are bit-identical to the in-worker path's. A worker then does about a third of the
# work per image and sends a quarter of the bytes (README "Data loading": measured 2.8x images/s per
# worker core on a 500x375 JPEG); the rest costs little on a GPU but runs in the training process, so
# on a CPU-only run it competes with the step. Only for augmentations that implement it
# (DINOMultiCrop; iBOTMultiCrop through it).
_C.INPUT.DEVICE_AUGMENTATION = False
# Turn every decoded image file upright by its EXIF Orientation tag, as image viewers do (every dataset
# that reads files: ImageFolder, FileList, for pretraining and evaluation; tools/visualize_attention.py).
# Cameras and phones store the pixels as the sensor read them and record the rotation in this tag, so
# without it a portrait photo is read lying on its side. False reads the pixels as stored, as
# torchvision's loader (and so the reference implementation) does: to reproduce its inputs exactly.
_C.INPUT.EXIF_TRANSPOSE = True

# ---------------------------------------------------------------------------------------------------
# Datasets and loading
# ---------------------------------------------------------------------------------------------------
_C.DATASETS = CN()
# DATASET_REGISTRY name of the pretraining set (labels, if any, are ignored by DINO): ImageFolder
# (root/<class>/...), UnlabeledFolder (every image under the root, any layout: one's own photos),
# FileList (a text file of paths), FashionMNIST, Synthetic.
_C.DATASETS.TRAIN = "ImageFolder"
# Root of the pretraining set (local path or iopath URI), read by TRAIN's builder.
_C.DATASETS.TRAIN_ROOT = "datasets/imagenet/train"
# Pretrain on a fixed random subset of this many images of DATASETS.TRAIN (drawn from SEED: the same
# on every rank and after a resume); 0: all. For quick runs and data-efficiency studies.
_C.DATASETS.TRAIN_SUBSET = 0
# UnlabeledFolder (every image under DATASETS.TRAIN_ROOT, any layout, label -1) caches its listing in
# OUTPUT_DIR/file_list_<hash of the root>.txt, so a restart does not walk millions of files again and
# sees the same images in the same order. The cache is rebuilt when it is missing, lists another root,
# or was made with another value of this counter: raise it (0 -> 1) to pick up images added or removed
# since. A recipe key on resume (tools/train_net.py --allow-config-change): a new listing is a new dataset.
_C.DATASETS.REFRESH_FILE_LIST = 0
# Number of images of the "Synthetic" dataset (tests and smoke runs; no file is read).
_C.DATASETS.SYNTHETIC_SIZE = 64
# Side in pixels of the "Synthetic" dataset's images.
_C.DATASETS.SYNTHETIC_IMAGE_SIZE = 64

# Fetch a dataset that supports downloading (FashionMNIST through torchvision) when it is not found
# locally. Off by default: nothing is downloaded unless asked.
_C.DATASETS.DOWNLOAD = False

_C.DATALOADER = CN()
# Loader worker processes per training process (paper: 10 per GPU).
_C.DATALOADER.NUM_WORKERS = 10
# What the pretraining loader does with an image file it cannot read (truncated, empty, not an image,
# over Pillow's decompression-bomb limit). False (default): skip it, replacing the sample by the next
# readable one (deterministically: resume stays exact), log and count it; one bad file in a million
# should not kill a multi-day run. True: stop at the first one with an error naming the file.
_C.DATALOADER.STRICT = False

# ---------------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------------
_C.SOLVER = CN()
# Optimizer: "adamw" (paper, ViTs), "sgd" (momentum 0.9) or "lars" (paper, ResNet-50).
_C.SOLVER.OPTIMIZER = "adamw"
# Peak learning rate for a total batch of 256; the run uses BASE_LR * total_batch / 256 (paper).
_C.SOLVER.BASE_LR = 0.0005
# Learning rate at the end of the cosine decay (paper: 1e-6).
_C.SOLVER.MIN_LR = 1e-6
# Epochs of linear learning-rate warmup from 0 (paper: 10).
_C.SOLVER.WARMUP_EPOCHS = 10
# SCHEDULER_REGISTRY name shaping the learning rate after warmup (paper: cosine).
_C.SOLVER.LR_SCHEDULER = "cosine"
# Training length in epochs (paper ViT-S/16 table: 100; the 800-epoch runs score higher).
_C.SOLVER.EPOCHS = 100
# Weight decay at iteration 0, on weights only (never on biases and 1-D parameters) (paper: 0.04).
_C.SOLVER.WEIGHT_DECAY = 0.04
# Weight decay at the end of training (paper: 0.4).
_C.SOLVER.WEIGHT_DECAY_END = 0.4
# SCHEDULER_REGISTRY name shaping the weight decay (paper: cosine).
_C.SOLVER.WEIGHT_DECAY_SCHEDULER = "cosine"
# Maximum gradient norm of each parameter, clipped separately (paper: 3.0; 0 disables).
_C.SOLVER.CLIP_GRAD = 3.0
# Epochs during which the head's last (prototype) layer gets no update (paper: 1).
_C.SOLVER.FREEZE_LAST_LAYER_EPOCHS = 1
# Images per training process per iteration (paper: 64 x 16 GPUs = 1024).
_C.SOLVER.BATCH_SIZE_PER_GPU = 64
# Momentum of SGD and LARS (paper's ResNet-50 recipe: 0.9). Unused by AdamW.
_C.SOLVER.MOMENTUM = 0.9
# AdamW betas (PyTorch default, as the paper).
_C.SOLVER.BETAS = (0.9, 0.999)
# Micro-batches accumulated per optimizer step. The total batch (and so the scaled learning rate)
# is BATCH_SIZE_PER_GPU * world size * ACCUMULATE_STEPS; the teacher EMA and the center are updated
# once per optimizer step, so accumulation matches training with the larger batch.
_C.SOLVER.ACCUMULATE_STEPS = 1
# Write OUTPUT_DIR/last_checkpoint.pth every this many iterations (and at each epoch end).
_C.SOLVER.CHECKPOINT_PERIOD = 1000
# Keep a numbered snapshot checkpoint_EEEE.pth every this many epochs (0: none; reference: 20).
_C.SOLVER.SNAPSHOT_EPOCHS = 20
# Optimizer steps with a NaN/inf loss or gradient that are skipped (no weight, teacher or center
# update; counted as nonfinite_skipped in metrics) before the run stops. 0: stop at the first, as
# the reference does. A few skips can ride out a rare bad batch; a diverging run still stops.
_C.SOLVER.SKIP_NONFINITE = 0

_C.SOLVER.AMP = CN()
# Mixed precision for the forward pass (paper: on, float16). Off on a CPU unless DTYPE is bfloat16.
_C.SOLVER.AMP.ENABLED = True
# "float16" (CUDA only; with a gradient scaler) or "bfloat16" (CPU and recent GPUs; no scaler).
_C.SOLVER.AMP.DTYPE = "float16"

# ---------------------------------------------------------------------------------------------------
# Evaluation (k-NN, linear probe, attention maps): the paper's protocols by default
# ---------------------------------------------------------------------------------------------------
_C.TEST = CN()
# DATASET_REGISTRY name of the labelled data used by k-NN and the linear probe.
_C.TEST.DATASET = "ImageFolder"
# Root of the labelled training split: the k-NN memory bank and the linear probe's training set.
_C.TEST.TRAIN_ROOT = "datasets/imagenet/train"
# Root of the labelled evaluation split (for FashionMNIST, the split is chosen by the dataset).
_C.TEST.VAL_ROOT = "datasets/imagenet/val"
# ImageFolder: the evaluation split is labelled with the training split's class index (label i is the
# same class in both; a class the evaluation split lacks is fine). A class folder of TEST.VAL_ROOT that
# TEST.TRAIN_ROOT does not have: "error" (stop, naming the class and both roots: its images have no
# label a k-NN or a linear probe could predict) or "ignore" (drop its images, with a warning).
_C.TEST.UNKNOWN_VAL_CLASSES = "error"
# Shorter side, in pixels, images are resized to before the center crop (paper: 256 for 224).
_C.TEST.RESIZE_SIZE = 256
# Side of the center crop fed to the backbone (paper: 224).
_C.TEST.CROP_SIZE = 224
# Images per process per batch when extracting features.
_C.TEST.BATCH_SIZE = 128
# Run the k-NN evaluation hook every this many epochs during training (0: never).
_C.TEST.EVAL_PERIOD = 0

_C.TEST.KNN = CN()
# Numbers of neighbours evaluated, all from one similarity pass (paper: 10, 20, 100, 200).
_C.TEST.KNN.K = (10, 20, 100, 200)
# Temperature T of the vote weights exp(similarity / T) (paper: 0.07).
_C.TEST.KNN.TEMPERATURE = 0.07
# Test features per similarity chunk: bounds memory at CHUNK_SIZE x train-set-size floats.
_C.TEST.KNN.CHUNK_SIZE = 256
# Also report k-NN on raw pixels (the flattened eval image), computed the same way: the baseline a
# self-supervised model should beat. Cheap on small images; off for ImageNet-size data.
_C.TEST.KNN.PIXEL_BASELINE = False
# Also score the teacher before the first step of a fresh run (random weights, or MODEL.WEIGHTS), as
# knn_init/*: the line training must rise above (curves.png draws it). Costs one more evaluation.
_C.TEST.KNN.INIT_BASELINE = False

# Draw OUTPUT_DIR/curves.png (loss, k-NN top-1 with its baselines, teacher entropy and KL, lr) after
# every k-NN evaluation and at the end of training.
_C.TEST.CURVES = True

_C.TEST.ATTENTION = CN()
# During training, draw the teacher's last-block [CLS] attention maps of NUM_IMAGES fixed images of
# TEST.DATASET (TEST.VAL_ROOT split, evaluation crop) every this many epochs and at the end, to
# TensorBoard (attention/image_K) and OUTPUT_DIR/attention/*.png. 0: never. ViT backbones only.
_C.TEST.ATTENTION.PERIOD = 0
# Number of fixed images, spread evenly over the split.
_C.TEST.ATTENTION.NUM_IMAGES = 4
# Fraction of each head's attention mass its mask keeps (paper, Fig. 3: 0.6).
_C.TEST.ATTENTION.THRESHOLD = 0.6

_C.TEST.LINEAR = CN()
# Training epochs of the linear classifier (paper: 100).
_C.TEST.LINEAR.EPOCHS = 100
# Learning rate for a batch of 256, scaled linearly with the total batch (paper: 0.001).
_C.TEST.LINEAR.BASE_LR = 0.001
# Images per process per batch (reference: 128 per GPU on 8 GPUs).
_C.TEST.LINEAR.BATCH_SIZE = 128
# SGD momentum (paper: 0.9) and weight decay (paper: 0).
_C.TEST.LINEAR.MOMENTUM = 0.9
_C.TEST.LINEAR.WEIGHT_DECAY = 0.0
# ViT features: CLS tokens of the last N blocks, concatenated (paper: 4 for ViT-S, 1 for ViT-B).
_C.TEST.LINEAR.N_LAST_BLOCKS = 4
# Append the average of the last block's patch tokens to the CLS tokens (paper: ViT-B only).
_C.TEST.LINEAR.AVGPOOL_PATCHTOKENS = False
# Fast mode: learning rates (per 256 images) trained together on cached features; the best is kept.
_C.TEST.LINEAR.LR_GRID = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)

# ---------------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------------
# Modules imported before anything is built, so the components they register can be named in this
# config: module names ("my_lab.dino_parts") or .py paths, relative to the current directory
# ("projects/SinkhornCentering/sinkhorn_centering.py"). See config/imports.py.
_C.IMPORTS = []
# Where checkpoints, logs, metrics and the dumped config go.
_C.OUTPUT_DIR = "./output"
# Global seed; each rank and data-loader worker derives its own from it.
_C.SEED = 0
# Log and write metrics every this many iterations.
_C.LOG_PERIOD = 20
