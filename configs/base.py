"""Every configuration key, with insightface's defaults
(insightface ``recognition/arcface_mxnet/sample_config.py`` and OLD ``src/train_softmax.py`` flags).

A preset (``configs/<name>.py``) sets only what differs; ``--config FILE`` loads the preset on top
of this file and CLI flags (insightface's kebab-case names) override both. Units and valid values
are given per key. ``symbols`` keeps equal defaults of its own for the keys it reads (it never imports
configs/); tests/test_registry.py checks that the two agree.
"""
from easydict import EasyDict as edict

config = edict()

# ---------------------------------------------------------------- network (symbols/)
config.network = "r100"          # registry key: r18 r34 r50 r100 r152 (fresnet "LResNet-E-IR"), y1 y2 (MobileFaceNet)
config.net_input = 1             # fresnet stem: 0 = 7x7/2 conv, 1 = 3x3/1 conv (insightface default), 2 = bn_data + 3x3/1
config.net_output = "E"          # embedding head (fc type registry): E GDC GAP GNAP F G H I J Z FC (y1/y2 use GDC)
config.net_unit = 3              # fresnet residual unit version: 1, 2, 3 ("IR" block, default)
config.net_se = 0                # 1 = squeeze-and-excitation in every residual unit
config.net_act = "prelu"         # activation: prelu (per-channel slope *_gamma, init 0.25) or any mx Activation type
config.net_blocks = [1, 4, 6, 2] # MobileFaceNet blocks per stage (y1 = [1,4,6,2], y2 = [2,8,16,4])
config.net_multiplier = 1.0      # filter-width multiplier (1.0 = insightface widths; 0.25 = quarter-width CPU nets)
config.bn_mom = 0.9              # BatchNorm momentum
config.workspace = 256           # convolution workspace, MB
config.emb_size = 512            # embedding dimension D of fc1
config.fast_prelu = True         # train PReLU as relu(x) - gamma*relu(-x) (same params/numerics, faster on CPU)
config.fused_prelu = False       # CPU: PReLU as the fused C++ operator (built on first use; falls back to fast_prelu);
                                 # same numbers, but no faster than fast_prelu for whole nets so far (benchmarks/)

# ---------------------------------------------------------------- loss head (symbols/losses)
config.loss = "arcface"          # softmax nsoftmax arcface arcface_v1 cosface sphereface combined triplet atriplet
config.loss_s = 64.0             # logit scale s for normalised heads
config.loss_m1 = 1.0             # multiplicative angular margin: cos(m1*theta + m2) - m3
config.loss_m2 = 0.5             # additive angular margin, radians
config.loss_m3 = 0.0             # additive cosine margin
config.easy_margin = 0           # arcface_v1 only: 1 = margin only where cos(theta) > 0
config.fc7_no_bias = False       # softmax head only: FullyConnected fc7 without bias
config.fc7_lr_mult = 1.0         # lr multiplier of fc7_weight (ignored unless honour_param_mults, as upstream)
config.fc7_wd_mult = 1.0         # wd multiplier of fc7_weight (ignored unless honour_param_mults, as upstream)
config.honour_param_mults = False  # False = insightface (mults ignored, wd on every param); True = honour lr/wd mults
config.ce_loss = True            # add BlockGrad(ce_loss) output (mean CE of margin logits, display only)
config.triplet_alpha = 0.3       # triplet margin alpha (squared-L2 units; atriplet: radians, preset 0.35)
config.images_per_identity = 5   # triplet bag: images per identity
config.triplet_bag_size = 7200   # triplet bag: images embedded per mining round
config.triplet_max_ap = 0.0      # skip (a,p) pairs with ||a-p||^2 above this (0 = off)

# ---------------------------------------------------------------- data (iterators/)
config.dataset = "emore"         # dataset name (informational; used in the run-directory name)
config.dataset_path = "../datasets/faces_emore"  # dir with train.rec, train.idx, property, <target>.bin
config.num_classes = 0           # 0 = read from <dataset_path>/property
config.image_shape = [112, 112, 3]  # H, W, C of the network input (square, C = 3)
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]  # verification packs <name>.bin in dataset_path
config.data_rand_mirror = True   # random horizontal flip, p = 0.5
config.data_cutoff = 0           # cutoff square side in pixels (0 = off)
config.data_color = 0            # colour jitter: 0 off, 1 jitter, 2 jitter + JPEG re-compression
config.data_images_filter = 0    # drop identities with fewer images than this
config.data_workers = 2          # decode/augment worker threads of FaceImageIter
config.seed = 0                  # seed of data order/augmentation and of initialisation (-1 = unseeded)

# ---------------------------------------------------------------- optimisation (recognition/)
config.per_batch_size = 128      # images per device; global batch = per_batch_size * number of devices
config.lr = 0.1                  # base learning rate
config.lr_steps = [100000, 160000, 220000]  # global batches after which lr *= 0.1
config.warmup_steps = 0          # linear lr warm-up over this many global batches (0 = off, as upstream)
config.wd = 0.0005               # weight decay
config.mom = 0.9                 # SGD momentum
config.kvstore = "device"        # device | local | dist_sync | dist_device_sync
config.gpus = ""                 # comma list of GPU ids ("" = CPU, or CUDA_VISIBLE_DEVICES when set)
config.ctx = ""                  # CPU contexts, e.g. "cpu:2" = two cpu contexts (data parallel on CPU)
config.dist = "none"             # data parallel across processes/nodes: none | horovod (start with horovodrun) |
                                 # kvstore (ps-lite; implied by kvstore dist_sync/dist_device_sync, start with
                                 # python -m recognition.launch); global batch = per_batch_size x devices x ranks
config.dist_timeout = 1800       # seconds a rank may wait for the others (collective or step) before the job
                                 # stops naming it; must exceed a verification pass (0 = no watchdog)
config.model_parallel = False    # True: fc7 split by class over the devices (insightface train_parall); backbone
                                 # data parallel, softmax normalised across the shards; checkpoints keep fc7_weight
config.sample_rate = 1.0         # Partial FC (insightface partial_fc): per step each shard trains its positive
                                 # classes + uniform negatives up to sample_rate x its classes; 0 < r <= 1 (< 1
                                 # implies model_parallel)
config.fp16 = False              # GPU: float16 body, float32 embedding/head/master weights (SGD multi_precision),
                                 # dynamic loss scaling with overflow skip (insightface train_parall --fp16-scale)
config.fp16_scale = 0.0          # initial loss scale (> 0 implies fp16, as train_parall; 0 = 65536)
config.max_steps = 0             # stop after this many global batches (0 = no limit)
config.end_epoch = 10000         # Module.fit num_epoch (effectively unlimited; use max_steps)

# ---------------------------------------------------------------- logging, verification, checkpoints
config.frequent = 20             # --frequent: log speed and training metrics every this many batches (Speedometer)
config.verbose = 2000            # --verbose (insightface's name): VERIFY on the .bin packs, and write the resume
                                 # state, every this many global batches; not a log level
config.ckpt = 3                  # --ckpt: checkpoint POLICY at each verification: 0 never save model files,
                                 # 1 save the best as a new number, 2 save every time, 3 best overwrites slot 1
config.ckpt_embedding = True     # True: checkpoint cut at fc1_output without fc7 (deployable); False: full symbol
config.models_root = "./models"  # run directories go here: <models_root>/<network>-<loss>-<dataset>
config.prefix = ""               # checkpoint prefix ("" = <run_dir>/model)
config.pretrained = ""           # "prefix,epoch": load weights only (missing fc7 allowed)
config.pretrained_epoch = 1      # epoch of pretrained when given as a bare prefix
config.resume = ""               # run directory to resume (optimizer state, step, lr, best accuracies)
