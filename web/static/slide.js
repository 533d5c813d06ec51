// The whole-slide page (slide.html): dicom-microscopy-viewer (window.dicomMicroscopyViewer, the
// copy the pinned OHIF package carries) on Hilum's DICOMweb: the series' VOLUME images as a
// pyramid, tiles fetched with WADO-RS frames, and each AI Segmentation of the slide over it.
(function () {
  "use strict";
  const element = document.getElementById("slide-viewport");
  const status = document.getElementById("slide-status");
  const segmentList = document.getElementById("slide-segments");
  const root = element.dataset.dicomweb;
  const study = element.dataset.study;
  const series = element.dataset.series;
  const dmv = window.dicomMicroscopyViewer;
  // Where the viewer finds its tile decoding worker and codecs (dataLoader.worker.min.js, the
  // wasm files): beside its script, not under OHIF's own default of /static/js/.
  window.PUBLIC_LIB_URL = "/dicom-microscopy-viewer/";
  const FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*';
  const JSON_TYPE = "application/dicom+json";

  // --- the part of dicomweb-client's API the viewer uses: each call answers the parts of a
  // multipart/related response (PS3.18 8.7.1), one ArrayBuffer per frame or bulk data item.
  const CRLF2 = new Uint8Array([13, 10, 13, 10]);

  function indexOf(bytes, pattern, from) {
    const first = pattern[0];
    for (let i = bytes.indexOf(first, from); i >= 0; i = bytes.indexOf(first, i + 1)) {
      if (i + pattern.length > bytes.length) return -1;
      let j = 1;
      while (j < pattern.length && bytes[i + j] === pattern[j]) j++;
      if (j === pattern.length) return i;
    }
    return -1;
  }

  function multipartParts(body, boundary) {
    const bytes = new Uint8Array(body);
    const delimiter = new TextEncoder().encode("--" + boundary);
    const parts = [];
    let at = indexOf(bytes, delimiter, 0);
    while (at >= 0) {
      const after = at + delimiter.length;
      if (bytes[after] === 45 && bytes[after + 1] === 45) break; // "--": the closing delimiter
      const headersEnd = indexOf(bytes, CRLF2, after);
      const next = indexOf(bytes, delimiter, after);
      if (headersEnd < 0 || next < 0) throw new Error("malformed multipart response");
      parts.push(body.slice(headersEnd + 4, next - 2)); // the part ends with CRLF
      at = next;
    }
    return parts;
  }

  async function get(url, accept) {
    const response = await fetch(url, { headers: { Accept: accept }, credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response;
  }

  async function parts(url, accept) {
    const response = await get(url, accept);
    const type = response.headers.get("Content-Type") || "";
    const body = await response.arrayBuffer();
    const boundary = /boundary="?([^";]+)"?/i.exec(type);
    return type.toLowerCase().startsWith("multipart/") && boundary
      ? multipartParts(body, boundary[1])
      : [body];
  }

  function instanceUrl(o) {
    return `${root}/studies/${o.studyInstanceUID}/series/${o.seriesInstanceUID}/instances/${o.sopInstanceUID}`;
  }

  const client = {
    retrieveInstanceFrames: (o) => parts(`${instanceUrl(o)}/frames/${o.frameNumbers.join(",")}`, FRAMES),
    retrieveBulkData: (o) => parts(o.BulkDataURI, FRAMES),
    retrieveInstance: async (o) =>
      (await parts(instanceUrl(o), 'multipart/related; type="application/dicom"'))[0],
  };

  async function seriesMetadata(seriesUid) {
    const response = await get(`${root}/studies/${study}/series/${seriesUid}/metadata`, JSON_TYPE);
    return response.json();
  }

  function value(item, tag) {
    const element = item[tag];
    return element && element.Value ? element.Value : [];
  }

  // --- the page -------------------------------------------------------------------------

  let tiles = 0;
  let failed = 0;
  let segmentsShown = [];
  function report(extra) {
    const shown = segmentsShown.length
      ? ` · AI segments shown: ${segmentsShown.join(", ")}`
      : "";
    status.textContent = `${tiles} tiles loaded${failed ? `, ${failed} failed` : ""}${shown}${extra || ""}`;
  }
  element.addEventListener(dmv.events.EVENTS.FRAME_LOADING_ENDED, () => {
    tiles += 1;
    report();
  });
  element.addEventListener(dmv.events.EVENTS.FRAME_LOADING_ERROR, () => {
    failed += 1;
    report();
  });

  async function slideSegmentations() {
    // Every SEG series of the study whose instances reference this slide's series.
    const response = await get(`${root}/studies/${study}/series?Modality=SEG`, JSON_TYPE);
    const found = [];
    for (const item of await response.json()) {
      const segSeries = value(item, "0020000E")[0];
      for (const instance of await seriesMetadata(segSeries)) {
        const referenced = value(instance, "00081115").map((s) => value(s, "0020000E")[0]);
        if (referenced.includes(series)) found.push(instance);
      }
    }
    return found;
  }

  function addSegmentToggles(viewer, descriptions) {
    segmentList.querySelector("legend").textContent = `AI segments: ${descriptions.join("; ")}`;
    for (const segment of viewer.getAllSegments()) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = true;
      // Half transparent: the tissue stays visible under the AI's outline.
      const show = () => viewer.showSegment(segment.uid, { opacity: 0.5 });
      box.addEventListener("change", () => (box.checked ? show() : viewer.hideSegment(segment.uid)));
      label.append(box, ` ${segment.label}`);
      segmentList.append(label);
      show();
      segmentsShown.push(segment.label);
    }
    segmentList.hidden = segmentsShown.length === 0;
  }

  async function open() {
    const images = (await seriesMetadata(series))
      .map((metadata) => new dmv.metadata.VLWholeSlideMicroscopyImage({ metadata }))
      .filter((image) => ["VOLUME", "THUMBNAIL"].includes(image.ImageType[2]));
    if (!images.length) {
      status.textContent = "This series holds no whole-slide image (VOLUME) to show.";
      return;
    }
    const viewer = new dmv.viewer.VolumeImageViewer({ client, metadata: images });
    viewer.render({ container: element });
    report();
    const segmentations = await slideSegmentations();
    if (segmentations.length) {
      viewer.addSegments(
        segmentations.map((metadata) => new dmv.metadata.Segmentation({ metadata })),
      );
      // The SEG's Series Description names the model (and says "not for clinical use" for a
      // reference model trained on synthetic data).
      addSegmentToggles(viewer, [
        ...new Set(segmentations.map((metadata) => value(metadata, "0008103E")[0] || "AI SEG")),
      ]);
      report();
    }
  }

  open().catch((error) => {
    status.textContent = `The slide could not be shown: ${error.message}`;
  });
})();
