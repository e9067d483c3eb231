"""StreamDiffusionV2 (github: chenfengxu714/StreamDiffusionV2, Apache-2.0), driven on a CPU: its source from the
package registry (:mod:`.source`), its own stream-batch loop on a tiny DiT (:mod:`.driver`). See README.md."""
