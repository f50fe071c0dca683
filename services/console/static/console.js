// scanwatch console: the worklist updates itself when a study is stored or scored (server-sent
// events from /worklist/events), by fetching its table again; no inline script anywhere.
(function () {
  "use strict";
  var table = document.getElementById("worklist-table");
  if (!table || !window.EventSource) { return; }
  var status = document.getElementById("live-status");
  var query = window.location.search.replace(/^\?/, "");
  var events = new EventSource("/worklist/events" + (query ? "?" + query : ""));
  var loading = false;
  function reload() {
    if (loading) { return; }
    loading = true;
    var url = "/worklist?" + (query ? query + "&" : "") + "fragment=1";
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (html) {
        if (html !== null) {
          table.innerHTML = html;  // rendered and escaped by the server's templates
          if (status) { status.textContent = "Updated " + new Date().toLocaleTimeString(); }
          document.dispatchEvent(new CustomEvent("worklist-updated"));
        }
      })
      .finally(function () { loading = false; });
  }
  events.addEventListener("changed", reload);
  events.addEventListener("signin", function () { window.location.assign("/signin?reason=expired"); });
})();

// Operator pages: a region that fetches its fragment again when the training worker answers
// (server-sent events from /operator/events).
(function () {
  "use strict";
  var region = document.getElementById("live-region");
  if (!region || !window.EventSource) { return; }
  var status = document.getElementById("live-status");
  var events = new EventSource(region.dataset.events);
  var loading = false;
  events.addEventListener("changed", function () {
    if (loading) { return; }
    loading = true;
    fetch(region.dataset.src, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (html) {
        if (html !== null) {
          region.innerHTML = html;  // rendered and escaped by the server's templates
          if (status) { status.textContent = "Updated " + new Date().toLocaleTimeString(); }
          document.dispatchEvent(new CustomEvent("operator-updated"));
        }
      })
      .finally(function () { loading = false; });
  });
})();
