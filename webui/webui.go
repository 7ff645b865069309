// Package webui is the web view every node serves under /ui/: the
// cluster's nodes, its images, and one image's block map drawn as a grid
// that follows a sync or relocation live. Plain HTML, CSS and JavaScript
// shipped inside the binary: no build step, nothing fetched from another
// site. The page reads the same API as the CLI (GET only), with the
// token a browser keeps in the login cookie (see api.RequireToken).
package webui

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var static embed.FS

// Handler serves the web view; mount it at /ui/.
func Handler() http.Handler {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree is part of the binary
	}
	files := http.StripPrefix("/ui/", http.FileServerFS(sub))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// Only this node's own files and API: no inline script, no
		// other origin, no framing.
		h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	})
}
