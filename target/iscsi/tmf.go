package iscsi

// Task management functions (RFC 7143 11.5.1).
const (
	tmfAbortTask        = 1
	tmfAbortTaskSet     = 2
	tmfClearACA         = 3
	tmfClearTaskSet     = 4
	tmfLUReset          = 5
	tmfTargetWarmReset  = 6
	tmfTargetColdReset  = 7
	tmfTaskReassign     = 8
	tmfRespComplete     = 0
	tmfRespNoTask       = 1
	tmfRespNoLUN        = 2
	tmfRespNoReassign   = 4
	tmfRespNotSupported = 5
	tmfRespRejected     = 255
)

// handleTMF runs a Task Management Function request. Affected commands are
// cancelled and get no response; the TMF response is sent once they have
// all ended (RFC 7143 4.2.3.2).
func (c *conn) handleTMF(p *pdu) error {
	h := &p.h
	if err := c.pr.discardData(h); err != nil {
		return err
	}
	if ok, err := c.admit(h, false); !ok || err != nil {
		return err
	}
	fn := h.flags() & 0x7f
	itt := h.itt()
	lun := decodeLUN(h.lunRaw())
	ref := h.u32(offTTT) // Referenced Task Tag
	resp := byte(tmfRespComplete)
	var victims []*task
	reset, cold := false, false

	if c.sess.lu == nil { // discovery session
		c.sendTMFResp(itt, tmfRespRejected, nil)
		return nil
	}
	c.mu.Lock()
	switch fn {
	case tmfAbortTask:
		t := c.tasks[ref]
		switch {
		case lun != 0:
			resp = tmfRespNoLUN
		case t == nil || t.aborted:
			resp = tmfRespNoTask
		default:
			victims = append(victims, t)
		}
	case tmfAbortTaskSet, tmfClearTaskSet, tmfLUReset:
		if lun != 0 {
			resp = tmfRespNoLUN
			break
		}
		for _, t := range c.tasks {
			if t.lun == lun {
				victims = append(victims, t)
			}
		}
		reset = fn == tmfLUReset
	case tmfTargetWarmReset, tmfTargetColdReset:
		for _, t := range c.tasks {
			victims = append(victims, t)
		}
		reset = true
		cold = fn == tmfTargetColdReset
	case tmfClearACA:
		resp = tmfRespNotSupported
	case tmfTaskReassign:
		resp = tmfRespNoReassign
	default:
		resp = tmfRespRejected
	}
	for _, t := range victims {
		c.abortLocked(t)
	}
	c.mu.Unlock()
	c.log.Debug("iscsi task management", "function", fn, "ref", ref, "affected", len(victims), "response", resp)
	if len(victims) == 0 && !reset {
		c.sendTMFResp(itt, resp, nil)
		return nil
	}
	c.cmdWG.Add(1)
	go func() {
		defer c.cmdWG.Done()
		for _, t := range victims {
			select {
			case <-t.done:
			case <-c.ctx.Done():
				return
			}
		}
		if reset {
			c.sess.lu.Reset(c.sess.nexus)
		}
		var after func()
		if cold {
			after = func() { go c.abort("target cold reset") }
		}
		c.sendTMFResp(itt, resp, after)
	}()
	return nil
}

func (c *conn) sendTMFResp(itt uint32, resp byte, after func()) {
	o := c.srv.newOut()
	h := o.h()
	h[0] = opTMFResp
	h[1] = flagFinal
	h[2] = resp
	h.setU32(offITT, itt)
	o.sn = snAdvance
	o.after = after
	c.enqueue(o)
}
