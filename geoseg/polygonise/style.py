"""The landcover layer's default style: a categorised renderer on ``class_id``, one category per class in the
class's colour and labelled with its name, as QML (which QGIS applies on opening the GeoPackage) and as SLD."""

from __future__ import annotations

import colorsys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from geoseg.gpkg import LayerStyle

RGB = tuple[int, int, int]
FIELD = "class_id"
_QGIS_DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
_SLD = "http://www.opengis.net/sld"
_SE = "http://www.opengis.net/se"
_OGC = "http://www.opengis.net/ogc"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"
for _prefix, _uri in (("", _SLD), ("se", _SE), ("ogc", _OGC), ("xsi", _XSI)):  # the prefixes SLD documents use
    ET.register_namespace(_prefix, _uri)


@dataclass(frozen=True)
class StyleClass:
    """One category of the style: a class id, its name (the legend label) and its colour."""

    id: int
    name: str
    rgb: RGB


def fallback_colour(class_id: int) -> RGB:
    """A colour for a class the class raster has none for: hues spread by the golden angle, so neighbouring
    ids stay distinguishable."""
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618033988749895) % 1.0, 0.65, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def layer_style(layer: str, classes: Sequence[StyleClass]) -> LayerStyle:
    """The layer's default style: QGIS reads the QML; the SLD says the same for other clients."""
    return LayerStyle(layer, qml(classes), sld(layer, classes),
                      f"land-cover classes by {FIELD}: {len(classes)} categories in the model's colours")


def qml(classes: Sequence[StyleClass]) -> str:
    """A QGIS style document holding only the symbology: categories on ``class_id`` with solid fills."""
    root = ET.Element("qgis", version="3.34.0", styleCategories="Symbology")
    renderer = ET.SubElement(root, "renderer-v2", type="categorizedSymbol", attr=FIELD, symbollevels="0",
                             enableorderby="0", forceraster="0", referencescale="-1")
    categories = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    for i, c in enumerate(classes):
        ET.SubElement(categories, "category", symbol=str(i), value=str(c.id), type="long", label=c.name,
                      render="true")
        symbols.append(_fill_symbol(str(i), c.rgb))
    ET.SubElement(root, "layerGeometryType").text = "2"  # polygons
    ET.indent(root)
    return _QGIS_DOCTYPE + ET.tostring(root, encoding="unicode")


def _fill_symbol(name: str, rgb: RGB) -> ET.Element:
    """A solid fill without outline (the polygons tile the map: outlines would only darken it)."""
    symbol = ET.Element("symbol", type="fill", name=name, alpha="1", clip_to_extent="1", force_rhr="0")
    layer = ET.SubElement(symbol, "layer", {"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
    options = ET.SubElement(layer, "Option", type="Map")
    colour = ",".join(str(v) for v in (*rgb, 255))
    for key, value in (("color", colour), ("style", "solid"), ("outline_color", colour), ("outline_style", "no"),
                       ("outline_width", "0"), ("outline_width_unit", "MM"), ("joinstyle", "bevel")):
        ET.SubElement(options, "Option", type="QString", name=key, value=value)
    return symbol


def sld(layer: str, classes: Sequence[StyleClass]) -> str:
    """The same categories as an SLD 1.1 document: one rule per class, filtered on ``class_id``."""
    root = ET.Element(f"{{{_SLD}}}StyledLayerDescriptor", {
        "version": "1.1.0",
        f"{{{_XSI}}}schemaLocation": f"{_SLD} http://schemas.opengis.net/sld/1.1.0/StyledLayerDescriptor.xsd"})
    named = ET.SubElement(root, f"{{{_SLD}}}NamedLayer")
    ET.SubElement(named, f"{{{_SE}}}Name").text = layer
    user = ET.SubElement(named, f"{{{_SLD}}}UserStyle")
    ET.SubElement(user, f"{{{_SE}}}Name").text = layer
    features = ET.SubElement(user, f"{{{_SE}}}FeatureTypeStyle")
    for c in classes:
        rule = ET.SubElement(features, f"{{{_SE}}}Rule")
        ET.SubElement(rule, f"{{{_SE}}}Name").text = c.name
        ET.SubElement(ET.SubElement(rule, f"{{{_SE}}}Description"), f"{{{_SE}}}Title").text = c.name
        equal = ET.SubElement(ET.SubElement(rule, f"{{{_OGC}}}Filter"), f"{{{_OGC}}}PropertyIsEqualTo")
        ET.SubElement(equal, f"{{{_OGC}}}PropertyName").text = FIELD
        ET.SubElement(equal, f"{{{_OGC}}}Literal").text = str(c.id)
        fill = ET.SubElement(ET.SubElement(rule, f"{{{_SE}}}PolygonSymbolizer"), f"{{{_SE}}}Fill")
        ET.SubElement(fill, f"{{{_SE}}}SvgParameter", name="fill").text = "#{:02x}{:02x}{:02x}".format(*c.rgb)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)
