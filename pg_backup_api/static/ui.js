// The page's only script: fetch a view with the token (if any) and follow a running operation.
// The token lives in this tab's sessionStorage and is sent as a header, never in a URL.
"use strict";
(function () {
  var KEY = "pg-backup-api-token";
  var view = document.getElementById("view");
  var login = document.getElementById("login");
  var stream = null;

  function headers() {
    var token = sessionStorage.getItem(KEY);
    return token ? { "Authorization": "Bearer " + token } : {};
  }

  function showLogin(message) {
    login.hidden = false;
    document.getElementById("login-error").textContent = message || "";
    view.innerHTML = "";
  }

  function load() {
    if (stream) { stream.abort(); stream = null; }
    document.getElementById("forget").hidden = !sessionStorage.getItem(KEY);
    // Relative URLs only: the page works under any prefix a proxy gives it.
    fetch("view" + location.search, { headers: headers() }).then(function (response) {
      if (response.status === 401 || response.status === 403) {
        return response.json().then(function (doc) { showLogin(doc.error); });
      }
      return response.text().then(function (html) {
        if (!response.ok) {
          var doc = {};
          try { doc = JSON.parse(html); } catch (e) { doc.error = html; }
          view.innerHTML = "";
          var p = document.createElement("p");
          p.className = "bad";
          p.textContent = response.status + " " + (doc.error || "");
          view.appendChild(p);
          return;
        }
        login.hidden = true;
        view.innerHTML = html;
        follow();
      });
    }).catch(function (err) { view.textContent = "cannot reach the service: " + err; });
  }

  // Barman's output, line by line as it is printed, then the final state; read with fetch so the
  // token goes in a header (EventSource cannot send one).
  function follow() {
    var pre = document.getElementById("output");
    if (!pre || pre.dataset.running !== "yes") { return; }
    pre.textContent = "";
    var url = "../servers/" + encodeURIComponent(pre.dataset.server) + "/operations/" +
      encodeURIComponent(pre.dataset.operation) + "/output?follow=1";
    var controller = new AbortController();
    stream = controller;
    fetch(url, { headers: headers(), signal: controller.signal }).then(function (response) {
      if (!response.ok || !response.body) { pre.textContent += "(cannot follow the output: " + response.status + ")\n"; return; }
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) { return; }
          buffer += decoder.decode(chunk.value, { stream: true });
          var events = buffer.split("\n\n");
          buffer = events.pop();
          events.forEach(handle);
          return pump();
        });
      }
      return pump();
    }).catch(function () { /* aborted on navigation */ });

    function handle(raw) {
      var name = "message";
      var data = [];
      raw.split("\n").forEach(function (line) {
        if (line.indexOf("event: ") === 0) { name = line.slice(7); }
        else if (line.indexOf("data: ") === 0) { data.push(line.slice(6)); }
      });
      if (!data.length) { return; }
      if (name === "status") {
        var doc = JSON.parse(data.join("\n"));
        var state = document.getElementById("state");
        state.textContent = doc.status + " (" + doc.state + ")";
        state.className = "state-" + doc.state;
        pre.dataset.running = "no";
        // The other fields (duration, phase, reason) were drawn while it ran: draw the ended operation.
        load();
      } else {
        pre.textContent += data.join("\n") + "\n";
        pre.scrollTop = pre.scrollHeight;
      }
    }
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest("a[data-nav]");
    if (!link || event.ctrlKey || event.metaKey || event.shiftKey) { return; }
    event.preventDefault();
    history.pushState(null, "", link.getAttribute("href"));
    load();
  });
  window.addEventListener("popstate", load);
  login.addEventListener("submit", function (event) {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("token").value.trim());
    document.getElementById("token").value = "";
    load();
  });
  document.getElementById("forget").addEventListener("click", function () {
    sessionStorage.removeItem(KEY);
    load();
  });
  load();
}());
