// scanwatch console: the clinician's study viewer. Like an outside viewer it reads the study only
// through DICOMweb (QIDO-RS instances, WADO-RS metadata and rendered PNGs) at the page's
// session-authenticated path (data-dicomweb), never with a token of its own. Every string that
// comes from DICOM is set with textContent. No inline script anywhere (CSP).
(function () {
  "use strict";
  var root = document.getElementById("viewer");
  if (!root) { return; }
  var STUDY = root.dataset.study;
  var BASE = root.dataset.dicomweb + "/studies/" + encodeURIComponent(STUDY);
  //: The worker's heatmap series (inference_worker/heatmaps.py) and its private block.
  var HEATMAP_SERIES_NUMBER = 9901;
  var PRIVATE_CREATOR = "SCANWATCH AI 1";
  var PRIVATE_GROUP = "0071";

  var canvas = document.getElementById("viewport");
  var ctx = canvas.getContext("2d");
  var status = document.getElementById("viewer-status");
  var overlayText = document.getElementById("viewport-overlay");
  var slider = document.getElementById("slice");
  var sliceOut = document.getElementById("slice-number");
  var preset = document.getElementById("wl-preset");
  var centerInput = document.getElementById("wl-center");
  var widthInput = document.getElementById("wl-width");
  var toggle = document.getElementById("show-heatmap");
  var opacity = document.getElementById("heatmap-opacity");
  var heatmapControls = document.getElementById("heatmap-controls");
  var noHeatmap = document.getElementById("no-heatmap");
  var table = document.getElementById("probabilities");
  var rows = document.getElementById("probability-rows");
  var evidenceSlice = document.getElementById("evidence-slice");
  var strongestBox = document.getElementById("strongest");
  var strongestButton = document.getElementById("go-strongest");
  var modelLine = document.getElementById("model-line");

  var slices = [];       // {series, sop, frame, number, window, heatmap}
  var current = 0;       // index into slices
  var strongest = -1;    // index of the slice with the strongest evidence
  var userWindow = null; // [center, width] once the user sets one; null: each slice's own
  var images = new Map();    // rendered URL -> Promise<ImageBitmap>
  var coloured = new Map();  // heatmap SOP -> Promise<canvas>
  var drawSerial = 0;
  var firstDrawn = false;

  // --- DICOM JSON -------------------------------------------------------------------------
  function values(ds, tag) { var e = ds && ds[tag]; return e && e.Value ? e.Value : []; }
  function first(ds, tag) { var v = values(ds, tag); return v.length ? v[0] : null; }
  function privateTag(ds, element) {
    // The block the creator reserved (PS3.5 §7.8.1): 0071,00xx names it, 0071,xxEE holds EE.
    for (var block = 0x10; block <= 0xff; block++) {
      var creator = PRIVATE_GROUP + "00" + block.toString(16).toUpperCase().padStart(2, "0");
      if (first(ds, creator) === PRIVATE_CREATOR) {
        return PRIVATE_GROUP + block.toString(16).toUpperCase().padStart(2, "0") + element;
      }
    }
    return null;
  }
  function privateValues(ds, element) {
    var tag = privateTag(ds, element);
    return tag ? values(ds, tag) : [];
  }

  function getJson(url) {
    return answered(url).then(function (answer) { return answer.json(); });
  }
  function answered(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/dicom+json" } })
      .then(function (answer) {
        if (answer.status === 401) { window.location.assign("/signin?reason=expired"); }
        if (!answer.ok) { throw new Error("the image server answered " + answer.status); }
        return answer;
      });
  }
  function searchAll(url, offset) {
    // QIDO-RS pages a long answer (a Warning says more are there): ask on from where it ended.
    return answered(url + "&offset=" + offset).then(function (answer) {
      var more = /additional results/.test(answer.headers.get("Warning") || "");
      return answer.json().then(function (found) {
        if (!more || !found.length) { return found; }
        return searchAll(url, offset + found.length).then(function (rest) { return found.concat(rest); });
      });
    });
  }

  // --- the study's slices and their heatmaps ----------------------------------------------
  // One QIDO-RS search (the index: no file read) lists every instance with its series; only the
  // heatmap series' metadata (its probabilities and references) is needed before the first
  // slice is drawn. The scored series' own headers (its windows) follow in the background.
  function load() {
    // The same URL as the page's preload (viewer.py INSTANCES_SEARCH), which answers it.
    var search = BASE + "/instances?includefield=SeriesNumber&includefield=SeriesDescription";
    return searchAll(search, 0).then(function (found) {
      var bySeries = new Map();
      found.forEach(function (ds) {
        var uid = first(ds, "0020000E");
        if (!bySeries.has(uid)) {
          bySeries.set(uid, { uid: uid, number: first(ds, "00200011"), description: first(ds, "0008103E"), instances: [] });
        }
        bySeries.get(uid).instances.push(ds);
      });
      var series = Array.from(bySeries.values());
      return Promise.all(series.map(function (s) {
        if (Number(s.number) !== HEATMAP_SERIES_NUMBER) { return s; }
        return getJson(BASE + "/series/" + encodeURIComponent(s.uid) + "/metadata").then(function (meta) {
          s.instances = meta;
          return s;
        });
      }));
    }).then(function (series) {
      var maps = series.filter(function (s) { return Number(s.number) === HEATMAP_SERIES_NUMBER; });
      var sources = series.filter(function (s) { return Number(s.number) !== HEATMAP_SERIES_NUMBER; });
      // With several model versions' heatmaps, the newest version's.
      maps.sort(function (a, b) {
        return Number(privateValues(a.instances[0], "14")[0] || 0) - Number(privateValues(b.instances[0], "14")[0] || 0);
      });
      var heatmaps = new Map();  // source SOP + "/" + frame -> heatmap
      var heatmapSeries = maps.length ? maps[maps.length - 1] : null;
      if (heatmapSeries) {
        heatmapSeries.instances.forEach(function (ds) {
          var source = first(ds, "00082112");
          if (!source) { return; }
          var key = first(source, "00081155") + "/" + (first(source, "00081160") || "");
          heatmaps.set(key, {
            series: heatmapSeries.uid,
            sop: first(ds, "00080018"),
            names: privateValues(ds, "10"),
            probabilities: privateValues(ds, "11").map(Number),
            explained: privateValues(ds, "12")[0] || null,
            model: privateValues(ds, "13")[0] || null,
            version: privateValues(ds, "14")[0] || null
          });
        });
      }
      // The scored series: the one the heatmaps lie over; without heatmaps, the largest.
      var scored = null;
      sources.forEach(function (s) {
        var hits = s.instances.filter(function (ds) {
          var sop = first(ds, "00080018");
          return heatmaps.has(sop + "/") || heatmaps.has(sop + "/1");
        }).length;
        s.hits = hits;
      });
      sources.sort(function (a, b) { return (b.hits - a.hits) || (b.instances.length - a.instances.length); });
      scored = sources[0] || null;
      if (!scored) { throw new Error("this study has no images to show"); }
      var instances = scored.instances.slice().sort(function (a, b) {
        return Number(first(a, "00200013") || 0) - Number(first(b, "00200013") || 0);
      });
      instances.forEach(function (ds) {
        var sop = first(ds, "00080018");
        var frames = Number(first(ds, "00280008") || 1);
        for (var f = 1; f <= frames; f++) {
          slices.push({
            series: scored.uid,
            sop: sop,
            frame: frames > 1 ? f : null,
            window: null,  // the header's, once its metadata has come
            heatmap: heatmaps.get(sop + "/" + (frames > 1 ? f : "")) || heatmaps.get(sop + "/" + f) || null
          });
        }
      });
      return { description: scored.description, heatmaps: heatmapSeries !== null, series: scored.uid };
    });
  }

  function evidence(heatmap) {
    // The slice's anomaly score, 1 - p(normal), as the worker ranks slices
    // (scanwatch.study_score: the Observation's strongest slice is the largest, the first on a
    // tie), and the abnormal class with the highest probability, to name it.
    var best = null, normal = null;
    heatmap.names.forEach(function (name, i) {
      var p = heatmap.probabilities[i];
      if (String(name).toLowerCase() === "normal") { normal = p; return; }
      if (best === null || p > best.p) { best = { name: name, p: p }; }
    });
    if (best !== null) { best.anomaly = normal === null ? best.p : 1 - normal; }
    return best;
  }

  // --- pixels -------------------------------------------------------------------------------
  // The window asked of WADO-RS: the user's, else none (the server applies the header's).
  function renderWindow() { return userWindow; }
  // The window shown in the inputs: the user's, else the slice's header's.
  function windowOf(slice) { return userWindow || slice.window; }

  function loadWindows(series) {
    // Each slice's own WindowCenter/WindowWidth (for the inputs and a drag's start).
    return getJson(BASE + "/series/" + encodeURIComponent(series) + "/metadata").then(function (meta) {
      var own = new Map();
      meta.forEach(function (ds) {
        var center = first(ds, "00281050"), width = first(ds, "00281051");
        if (center !== null && width !== null) { own.set(first(ds, "00080018"), [Number(center), Number(width)]); }
      });
      slices.forEach(function (slice) { slice.window = own.get(slice.sop) || null; });
      if (!userWindow) { describe(); }
    }).catch(function () { return null; });  // the images show without it
  }

  function renderedUrl(series, sop, frame, win) {
    var url = BASE + "/series/" + encodeURIComponent(series) + "/instances/" + encodeURIComponent(sop) +
      (frame ? "/frames/" + frame : "") + "/rendered";
    return win ? url + "?window=" + encodeURIComponent(Math.round(win[0]) + "," + Math.max(1, Math.round(win[1]))) : url;
  }

  function bitmap(url, signal) {
    if (!images.has(url)) {
      var promise = fetch(url, { credentials: "same-origin", headers: { "Accept": "image/png" }, signal: signal })
        .then(function (answer) {
          if (!answer.ok) { throw new Error("the image server answered " + answer.status); }
          return answer.blob();
        })
        .then(function (blob) { return createImageBitmap(blob); });
      promise.catch(function () { images.delete(url); });
      images.set(url, promise);
      bound(images);
    }
    return images.get(url);
  }

  // A long series must not fill the browser's memory: the oldest entries go first (a Map keeps
  // insertion order); prefetching stays within PREFETCH_SPAN slices of the current one.
  var CACHE_LIMIT = 160;
  var PREFETCH_SPAN = 60;
  function bound(cache) {
    while (cache.size > CACHE_LIMIT) { cache.delete(cache.keys().next().value); }
  }

  // A colour map (dark red → red → yellow → white, "hot"), transparent where the map is low so
  // the anatomy under weak evidence stays visible.
  var LUT = (function () {
    var lut = new Uint8ClampedArray(256 * 4);
    for (var v = 0; v < 256; v++) {
      var t = v / 255;
      lut[v * 4] = Math.min(255, 255 * t * 2.2 + 60);
      lut[v * 4 + 1] = Math.max(0, Math.min(255, 255 * (t - 0.4) * 2.4));
      lut[v * 4 + 2] = Math.max(0, Math.min(255, 255 * (t - 0.8) * 5));
      lut[v * 4 + 3] = v < 20 ? 0 : Math.min(255, (v - 20) * 3);
    }
    return lut;
  })();

  function colouredHeatmap(heatmap, signal) {
    if (!coloured.has(heatmap.sop)) {
      // 8-bit, 255 the map's maximum: a window that passes the stored values through.
      var url = renderedUrl(heatmap.series, heatmap.sop, null, [128, 256]);
      var promise = bitmap(url, signal).then(function (grey) {
        var layer = document.createElement("canvas");
        layer.width = grey.width;
        layer.height = grey.height;
        var lctx = layer.getContext("2d");
        lctx.drawImage(grey, 0, 0);
        var data = lctx.getImageData(0, 0, layer.width, layer.height);
        var px = data.data;
        for (var i = 0; i < px.length; i += 4) {
          var v = px[i] * 4;
          px[i] = LUT[v]; px[i + 1] = LUT[v + 1]; px[i + 2] = LUT[v + 2]; px[i + 3] = LUT[v + 3];
        }
        lctx.putImageData(data, 0, 0);
        return layer;
      });
      promise.catch(function () { coloured.delete(heatmap.sop); });
      coloured.set(heatmap.sop, promise);
      bound(coloured);
    }
    return coloured.get(heatmap.sop);
  }

  function draw() {
    var serial = ++drawSerial;
    var slice = slices[current];
    var wanted = [bitmap(renderedUrl(slice.series, slice.sop, slice.frame, renderWindow()))];
    var withHeatmap = toggle.checked && slice.heatmap;
    if (withHeatmap) { wanted.push(colouredHeatmap(slice.heatmap)); }
    return Promise.all(wanted).then(function (got) {
      if (serial !== drawSerial) { return; }  // a newer slice or window was asked for
      var image = got[0];
      if (canvas.width !== image.width || canvas.height !== image.height) {
        canvas.width = image.width;
        canvas.height = image.height;
      }
      ctx.globalAlpha = 1;
      ctx.drawImage(image, 0, 0);
      if (withHeatmap) {
        ctx.globalAlpha = Number(opacity.value) / 100;
        ctx.drawImage(got[1], 0, 0, canvas.width, canvas.height);
        ctx.globalAlpha = 1;
      }
      canvas.dataset.drawn = String(current + 1) + (withHeatmap ? "+heatmap" : "");
      canvas.dataset.draws = String(Number(canvas.dataset.draws || 0) + 1);
      if (!firstDrawn) {
        firstDrawn = true;
        performance.mark("viewer-first-slice");  // read by bench/viewer.py
        prefetch();
      }
    }).catch(function (error) {
      if (serial !== drawSerial) { return; }
      // A prefetch this draw shared was called off (a new window or a long jump): ask again.
      if (error && error.name === "AbortError") { return draw(); }
      status.textContent = "This slice could not be shown: " + error.message + ".";
    });
  }

  // A new prefetch calls off the one before (its requests are aborted): after a window change
  // its images are of no use, and they would queue before the slice the user is looking at.
  var prefetchedAround = -1;
  var prefetching = null;
  function prefetch() {
    // The other slices (and their heatmaps) at the current window, a few at a time, nearest first.
    prefetchedAround = current;
    if (prefetching) { prefetching.abort(); }
    var controller = prefetching = new AbortController();
    var order = slices.map(function (_, i) { return i; })
      .filter(function (i) { return Math.abs(i - current) <= PREFETCH_SPAN; })
      .sort(function (a, b) { return Math.abs(a - current) - Math.abs(b - current); });
    var next = 0;
    function one() {
      if (next >= order.length || controller.signal.aborted) { return Promise.resolve(); }
      var slice = slices[order[next++]];
      var jobs = [bitmap(renderedUrl(slice.series, slice.sop, slice.frame, renderWindow()), controller.signal)];
      if (slice.heatmap) { jobs.push(colouredHeatmap(slice.heatmap, controller.signal)); }
      return Promise.all(jobs).catch(function () { return null; }).then(one);
    }
    for (var i = 0; i < 4; i++) { one(); }
  }

  // --- what the page says about the current slice --------------------------------------------
  function describe() {
    var slice = slices[current];
    var n = current + 1, m = slices.length;
    var label = "Slice " + n + " of " + m;
    if (slice.heatmap && toggle.checked) { label += ", AI heatmap shown"; }
    if (current === strongest) { label += ", strongest AI evidence"; }
    canvas.setAttribute("aria-label", label);
    slider.value = String(n);
    sliceOut.textContent = n + " / " + m;
    var win = windowOf(slice);
    centerInput.value = win ? String(Math.round(win[0])) : "";
    widthInput.value = win ? String(Math.round(win[1])) : "";
    overlayText.textContent = "Slice " + n + "/" + m + (win ? "  W " + Math.round(win[1]) + " L " + Math.round(win[0]) : "");

    rows.replaceChildren();
    if (!slice.heatmap) {
      table.hidden = true;
      evidenceSlice.textContent = noHeatmap.hidden ? "Slice " + n + " was not scored: no probabilities for it." : "";
      return;
    }
    table.hidden = false;
    evidenceSlice.textContent = "Slice " + n + " of " + m + (current === strongest ? ": the strongest evidence in this study" : "");
    slice.heatmap.names.forEach(function (name, i) {
      var p = slice.heatmap.probabilities[i];
      var tr = document.createElement("tr");
      if (name === slice.heatmap.explained) { tr.className = "explained"; }
      var th = document.createElement("th");
      th.scope = "row";
      th.textContent = name + (name === slice.heatmap.explained ? " (heatmap)" : "");
      var td = document.createElement("td");
      var bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      bar.style.width = Math.round(p * 100) + "%";
      var text = document.createElement("span");
      text.className = "value";
      text.textContent = (p * 100).toFixed(1) + " %";
      td.append(text, bar);
      tr.append(th, td);
      rows.append(tr);
    });
    var h = slice.heatmap;
    modelLine.textContent = "AI preliminary: " + (h.model || "model unknown") + (h.version ? " version " + h.version : "") +
      (h.explained ? "; the heatmap explains \u201c" + h.explained + "\u201d" : "");
  }

  function go(index) {
    if (!slices.length) { return; }
    index = Math.max(0, Math.min(slices.length - 1, index));
    if (index === current && firstDrawn) { return; }
    current = index;
    describe();
    draw();
    if (firstDrawn && Math.abs(current - prefetchedAround) > PREFETCH_SPAN / 2) { prefetch(); }
  }

  // --- controls -------------------------------------------------------------------------------
  function step(delta) { go(current + delta); }
  var page = function () { return Math.max(1, Math.round(slices.length / 10)); };

  canvas.addEventListener("keydown", function (event) {
    var moves = {
      ArrowUp: -1, ArrowLeft: -1, ArrowDown: 1, ArrowRight: 1,
      PageUp: -page(), PageDown: page(), Home: -slices.length, End: slices.length
    };
    if (Object.prototype.hasOwnProperty.call(moves, event.key)) {
      event.preventDefault();
      step(moves[event.key]);
    }
  });
  canvas.addEventListener("wheel", function (event) {
    if (!event.deltaY) { return; }
    event.preventDefault();
    step(event.deltaY > 0 ? 1 : -1);
  }, { passive: false });
  slider.addEventListener("input", function () { go(Number(slider.value) - 1); });

  // A new window: one rendering asked of the server at a time (a drag moves faster than the
  // server answers), then the latest window; the slices cached at the old window are let go.
  var windowBusy = false, windowPending = false;
  function setWindow(win, settled) {
    userWindow = win;
    if (prefetching) { prefetching.abort(); }
    images.clear();
    describe();
    if (windowBusy) { windowPending = true; return; }
    windowBusy = true;
    draw().then(function () {
      windowBusy = false;
      if (windowPending) {
        windowPending = false;
        setWindow(userWindow, settled);
      } else if (settled) {
        prefetch();
      }
    });
  }
  preset.addEventListener("change", function () {
    if (preset.value === "default") { setWindow(null, true); return; }
    var parts = preset.value.split(",").map(Number);
    setWindow([parts[0], parts[1]], true);
  });
  function typed() {
    var c = Number(centerInput.value), w = Number(widthInput.value);
    if (centerInput.value === "" || widthInput.value === "" || !isFinite(c) || !isFinite(w) || w < 1) { return; }
    preset.selectedIndex = -1;
    setWindow([c, w], true);
  }
  centerInput.addEventListener("change", typed);
  widthInput.addEventListener("change", typed);

  // Drag: left–right changes the width, up–down the centre (as most viewers do).
  var drag = null;
  canvas.addEventListener("pointerdown", function (event) {
    if (event.button !== 0 || !slices.length) { return; }
    var win = windowOf(slices[current]) || [128, 256];
    drag = { x: event.clientX, y: event.clientY, win: win.slice() };
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", function (event) {
    if (!drag) { return; }
    var scale = Math.max(1, drag.win[1]) / 256;
    var width = Math.max(1, drag.win[1] + (event.clientX - drag.x) * scale * 2);
    var center = drag.win[0] + (event.clientY - drag.y) * scale;
    preset.selectedIndex = -1;
    setWindow([center, width], false);
  });
  function endDrag() {
    if (drag) { drag = null; prefetch(); }
  }
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);

  toggle.addEventListener("change", function () { describe(); draw(); });
  opacity.addEventListener("input", function () { draw(); });
  strongestButton.addEventListener("click", function () { go(strongest); canvas.focus(); });

  // --- start ----------------------------------------------------------------------------------
  load().then(function (found) {
    var m = slices.length;
    slider.max = String(m);
    slices.forEach(function (slice, i) {
      if (!slice.heatmap) { return; }
      var e = evidence(slice.heatmap);
      if (e && (strongest < 0 || e.anomaly > evidence(slices[strongest].heatmap).anomaly)) { strongest = i; }
    });
    if (!found.heatmaps) {
      noHeatmap.hidden = false;
      heatmapControls.hidden = true;
      toggle.checked = false;
    }
    var start = strongest >= 0 ? strongest : 0;
    if (strongest >= 0) {
      var e = evidence(slices[strongest].heatmap);
      strongestButton.textContent = "Go to the strongest evidence: slice " + (strongest + 1) +
        " (" + e.name + " " + (e.p * 100).toFixed(1) + " %)";
      strongestBox.hidden = false;
      var ticks = document.createElement("datalist");
      ticks.id = "slice-marks";
      var mark = document.createElement("option");
      mark.value = String(strongest + 1);
      ticks.append(mark);
      root.append(ticks);
      slider.setAttribute("list", "slice-marks");
    }
    status.textContent = (found.description ? "Series \u201c" + found.description + "\u201d, " : "") + m +
      " slice" + (m === 1 ? "" : "s") + (strongest >= 0 ? "; opened at the slice with the strongest AI evidence." : ".");
    current = start;
    describe();
    return draw().then(function () { return loadWindows(found.series); });
  }).catch(function (error) {
    status.textContent = "The images could not be loaded: " + error.message + ".";
  });
})();
