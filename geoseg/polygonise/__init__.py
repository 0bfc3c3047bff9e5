"""Vectorising a class raster block by block, exactly equal to one whole-raster polygonisation.

The dataflow, module by module, in the order :func:`vectorise` (``driver``) runs it:

1. ``raster``: open the class raster's (and confidence raster's) header, refuse what cannot give correct
   polygons and areas; class names come from the argument, else the raster's tag (``legend``).
2. ``sieve`` (only with ``min_area_m2``, the minimum mapping unit): a first pass describes every block's
   patches (sizes, adjacencies, no geometry); the driver joins them across borders into whole patches and
   merges those below the unit into their largest edge neighbour, giving each block new classes per label.
3. ``blocks``: each block is polygonised on its own (``rasterio.features.shapes``) in integer pixel
   coordinates; a polygon touching no internal block border is finished as it is, the others are pieces
   that travel with the 1-pixel strips along the block's borders.
4. ``seams``: while blocks arrive, the facing strips tell which pieces are one region, a union-find
   (``unionfind``) groups them, and each region complete on all sides is unioned in a merge job.
5. ``simplify`` (only with ``simplify_m``): coverage simplification of all polygons together.
6. ``layer``: regions become rows of the GeoPackage's ``landcover`` layer; class areas are summed; ``style``
   gives the layer its default QGIS style (categories by class in the class raster's colours).

``executor`` runs the blocks' and merges' jobs as Ray tasks when ``ray.is_initialized()``, else in-process,
in submission order with a bounded number in flight. Only the strips, the crossing pieces and the finished
polygons of a block ever leave the block's task.
"""

from __future__ import annotations

from geoseg.polygonise.blocks import BlockPieces, BlockWindow, Finished, block_grid, polygonise_block
from geoseg.polygonise.driver import vectorise
from geoseg.polygonise.layer import FIELDS, LAYER
from geoseg.polygonise.legend import CLASS_NAMES_TAG, load_legend
from geoseg.polygonise.seams import Held, MergeJob, SeamJoiner, merge_task

__all__ = ["vectorise", "load_legend", "CLASS_NAMES_TAG", "LAYER", "FIELDS", "BlockWindow", "block_grid",
           "polygonise_block", "BlockPieces", "Finished", "SeamJoiner", "Held", "MergeJob", "merge_task"]
