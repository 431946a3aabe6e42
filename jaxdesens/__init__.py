"""jaxdesens: mask-based image set desensitization with recognition support, in JAX/Flax.

Modules (imported on use, so `import jaxdesens` stays light):
  jaxdesens.data            identity folders, synthetic faces, splits, grain pipeline, array_record, LFW
  jaxdesens.align           face alignment onto one template (dlib landmarks, similarity transform)
  jaxdesens.models          ResNet-18/34 with the Feature Selection Masknet; BN-folded functional net
  jaxdesens.masks           free-form masks on device, hole-ratio levels, mask files
  jaxdesens.saliency        contrastive Excitation Backprop (custom_vjp) and the critical template
  jaxdesens.search          Algorithm 1 (vmapped, chunked candidate scoring)
  jaxdesens.state           what a checkpoint holds: model from a config, optimizer, schedule
  jaxdesens.recognizer      a trained model with its embedding, read from any workdir (`load_recognizer`)
  jaxdesens.train           training (resnet / mask / fsm), data-parallel, resumable
  jaxdesens.desensitize     mask / blur / mosaic operators and the hand-off exporter
  jaxdesens.metrics         verification, image quality, inpainting attacks
  jaxdesens.federation      FedAvg / FedBN: simulation on a (clients, data) mesh; Flower ServerApp/ClientApp
  jaxdesens.jobs            the CLI jobs (search, evaluate, pipeline)
  jaxdesens.xla_flags       the XLA:CPU convolution flag, applied here, before JAX starts its backend
"""

from jaxdesens import xla_flags  # noqa: F401  (must run before JAX starts; see its docstring)

__version__ = "0.1.0"
