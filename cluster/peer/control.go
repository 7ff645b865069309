package peer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// Control calls: what one node asks another about its copies and its
// ownership, as opposed to their data. They run on the data transport's
// HTTP/2 connection (with TLS: only from a member's certificate), not on
// the operator's /v1 API.

// Control is the node's side of the control calls.
type Control interface {
	// PrepareCopy creates the node's empty copy of a new image (the same
	// size again is not an error).
	PrepareCopy(ctx context.Context, id string, size int64) error
	// GrowCopy extends the node's copy of image id to size before the
	// record grows.
	GrowCopy(ctx context.Context, id string, size int64) error
	// Release gives up ownership of the image now (a handover asked by
	// the node it is being attached to).
	Release(ctx context.Context, image string) error
}

const (
	pathControl = "/peer/v1/control/"
	hImage      = "Ukai-Image"
)

// ErrNoControl: the peer serves no control calls.
var errNoControl = errors.New("this node serves no control calls")

func (s *Server) control(w http.ResponseWriter, r *http.Request) {
	s.handlers.Add(1)
	defer s.handlers.Done()
	op := r.PathValue("op")
	err := s.serveControl(r.Context(), r, op)
	if err != nil {
		s.reply(w, r, "control "+op, s.status(r.Context(), err), err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) serveControl(ctx context.Context, r *http.Request, op string) error {
	if s.cfg.Control == nil {
		return fmt.Errorf("%w: %v", ErrNoCopy, errNoControl)
	}
	if r.TLS != nil && (s.cfg.Member == nil || !s.cfg.Member(certNode(r.TLS))) {
		return fmt.Errorf("%w: control calls are served only to members of the cluster (certificate %q)", ErrForbidden, certNode(r.TLS))
	}
	switch op {
	case "prepare", "grow":
		id := r.Header.Get(hID)
		if !validID(id) {
			return fmt.Errorf("%w: image id %q is not 32 hex digits", ErrBadRequest, id)
		}
		size, err := headerUint(r.Header, hSize)
		if err != nil {
			return err
		}
		if size == 0 || size > 1<<62 {
			return fmt.Errorf("%w: size %d", ErrBadRequest, size)
		}
		if op == "prepare" {
			return s.cfg.Control.PrepareCopy(ctx, id, int64(size))
		}
		return s.cfg.Control.GrowCopy(ctx, id, int64(size))
	case "release":
		name := r.Header.Get(hImage)
		if name == "" || len(name) > 64 {
			return fmt.Errorf("%w: image name %q", ErrBadRequest, name)
		}
		return s.cfg.Control.Release(ctx, name)
	}
	return fmt.Errorf("%w: unknown control call %q", ErrBadRequest, op)
}

// PrepareCopy asks the peer to create its empty copy of a new image.
func (c *Client) PrepareCopy(ctx context.Context, id string, size int64) error {
	return c.controlCall(ctx, "prepare", [][2]string{{hID, id}, {hSize, strconv.FormatInt(size, 10)}})
}

// GrowCopy asks the peer to extend its copy of image id to size.
func (c *Client) GrowCopy(ctx context.Context, id string, size int64) error {
	return c.controlCall(ctx, "grow", [][2]string{{hID, id}, {hSize, strconv.FormatInt(size, 10)}})
}

// Release asks the peer to give up ownership of the image now.
func (c *Client) Release(ctx context.Context, image string) error {
	return c.controlCall(ctx, "release", [][2]string{{hImage, image}})
}

func (c *Client) controlCall(ctx context.Context, op string, hdr [][2]string) error {
	if c.closed.Load() {
		return fmt.Errorf("peer %s: %s: %w: %v", c.addr, op, ErrUnavailable, errClosed)
	}
	k := c.begin(ctx, op)
	defer k.finish()
	req, err := http.NewRequestWithContext(k.ctx, http.MethodPost, c.base+pathControl+op, nil)
	if err != nil {
		return fmt.Errorf("peer %s: %s: %w", c.addr, op, err)
	}
	for _, kv := range hdr {
		req.Header[kv[0]] = []string{kv[1]}
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return k.fail(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrBody))
		return k.statusErr(resp.StatusCode, string(msg))
	}
	return nil
}
