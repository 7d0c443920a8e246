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
        place();
        follow();
      });
    }).catch(function (err) { view.textContent = "cannot reach the service: " + err; });
  }

  // The time line's marks: the page's policy (CSP) allows no style attribute, but a script may set
  // a style property.
  function place() {
    Array.prototype.forEach.call(view.querySelectorAll("[data-left]"), function (mark) {
      mark.style.left = mark.dataset.left + "%";
      if (mark.dataset.width) { mark.style.width = mark.dataset.width + "%"; }
    });
  }

  // Barman's output, line by line as it is printed, then the final state; read with fetch so the
  // token goes in a header (EventSource cannot send one). Lines end at CR, LF or CRLF, as the
  // event stream format says.
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
      var name = "";
      var data = [];
      function line(text) {
        if (text === "") {
          if (data.length) { handle(name || "message", data.join("\n")); }
          name = "";
          data = [];
          return;
        }
        var colon = text.indexOf(":");
        if (colon === 0) { return; }  // a comment
        var field = colon < 0 ? text : text.slice(0, colon);
        var value = colon < 0 ? "" : text.slice(colon + 1);
        if (value.charAt(0) === " ") { value = value.slice(1); }
        if (field === "event") { name = value; } else if (field === "data") { data.push(value); }
      }
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) { return; }
          buffer += decoder.decode(chunk.value, { stream: true });
          var end;
          while ((end = /\r\n|\r|\n/.exec(buffer)) !== null) {
            // A CR at the very end may be the first half of a CRLF: wait for the next chunk.
            if (end[0] === "\r" && end.index + 1 === buffer.length) { break; }
            line(buffer.slice(0, end.index));
            buffer = buffer.slice(end.index + end[0].length);
          }
          return pump();
        });
      }
      return pump();
    }).catch(function () { /* aborted on navigation */ });

    function handle(name, text) {
      if (name === "status") {
        var doc = JSON.parse(text);
        var state = document.getElementById("state");
        state.textContent = doc.status + " (" + doc.state + ")";
        state.className = "state-" + doc.state;
        pre.dataset.running = "no";
        // The other fields (duration, phase, reason) were drawn while it ran: draw the ended operation.
        load();
      } else if (name === "message") {
        pre.textContent += text + "\n";
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
