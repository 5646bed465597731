-- At most one unfinished release per app and environment, enforced by the
-- database so that two servers accepting a release at the same moment
-- cannot both start one.
CREATE UNIQUE INDEX releases_one_open ON releases (app, env) WHERE finished = 0;
