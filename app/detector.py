"""The detector stage: a Ray Data class UDF that runs the model once per actor over batches of decoded
images and returns result rows (app.results.RESULT_SCHEMA), boxes in original pixels."""

import numpy as np
import pyarrow as pa
import ray
import torch

from app.model import ModelSpec, build_model
from app.results import RESULT_SCHEMA


def choose_device() -> torch.device:
    """CUDA when Ray gave this actor a GPU and torch can see one, else CPU."""
    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def scale_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Map [x1, y1, x2, y2] boxes from an image of from_size (width, height) onto one of to_size."""
    scale_x = to_size[0] / from_size[0]
    scale_y = to_size[1] / from_size[1]
    return (boxes * np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)).astype(np.float32)


class Detector:
    """Built once per actor: loads the model, then detects objects in each batch it is called with."""

    def __init__(self, spec: ModelSpec, num_threads: int):
        torch.set_num_threads(max(1, num_threads))
        self.device = choose_device()
        model, self.categories = build_model(spec)
        self.model = model.to(self.device)

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run the model on HWC uint8 images; returns boxes, scores and labels per image, on the CPU."""
        if not images:
            return []
        pin = self.device.type == "cuda"
        tensors = []
        for image in images:
            tensor = torch.from_numpy(image)
            if pin:
                tensor = tensor.pin_memory()
            # uint8 crosses to the device; conversion to float happens there.
            tensor = tensor.to(self.device, non_blocking=pin).permute(2, 0, 1).float().div_(255.0)
            tensors.append(tensor)
        outputs = self.model(tensors)
        return [{key: value.cpu().numpy() for key, value in output.items()} for output in outputs]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pydict()
        ok = [i for i, kind in enumerate(rows["error_kind"]) if kind is None]
        images = [
            np.frombuffer(bytearray(rows["pixels"][i]), dtype=np.uint8).reshape(rows["pixel_height"][i], rows["pixel_width"][i], 3)
            for i in ok
        ]
        detections = dict(zip(ok, self.predict(images)))
        result = {name: [] for name in RESULT_SCHEMA.names}
        for i, path in enumerate(rows["path"]):
            found = detections.get(i)
            if found is None:
                boxes, scores, labels = np.zeros((0, 4), np.float32), [], []
            else:
                model_size = (rows["pixel_width"][i], rows["pixel_height"][i])
                boxes = scale_boxes(found["boxes"], model_size, (rows["width"][i], rows["height"][i]))
                scores, labels = found["scores"].tolist(), found["labels"].tolist()
            result["path"].append(path)
            result["width"].append(rows["width"][i])
            result["height"].append(rows["height"][i])
            result["boxes"].append(boxes.tolist())
            result["scores"].append(scores)
            result["labels"].append(labels)
            result["label_names"].append([self.categories[label] for label in labels])
            result["num_detections"].append(len(labels))
            result["error_kind"].append(rows["error_kind"][i])
            result["error"].append(rows["error"][i])
        return pa.table(result, schema=RESULT_SCHEMA)
